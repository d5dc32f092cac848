"""A whole evaluation: the orderings that must hold, reproducibility, shards, progress."""

from dataclasses import replace
from typing import Any

import pytest
import torch

from evaluator.ablations import Ablation
from evaluator.attacks import Classifier, VoteProtocol
from evaluator.benchmarks import get_benchmark
from evaluator.errors import EvaluationCancelled
from evaluator.evaluate import EvalOptions, Metric, Phase, Progress, evaluate, evaluation_order
from evaluator.transforms import GridSpec, TransformBox
from tests.evaluator.helpers import self_labelled, tiny_cnn

BENCH = replace(
    get_benchmark("digits"),
    image_size=(16, 16),
    grid=GridSpec(TransformBox(30, 3, 3), 7, 3, 3),
    vote_samples=5,
    worst_of_k=6,
    vote_subset=None,
    landscape_subset=None,
    first_order=False,
    ablations=(),
)


def run(device: torch.device = torch.device("cpu"), n: int = 80, **options):
    model = tiny_cnn()
    data = self_labelled(model, n)
    clf = Classifier(model, 10, device=device, batch_size=128)
    return evaluate(clf, data, BENCH, EvalOptions(**options))


@pytest.fixture(scope="module")
def result():
    return run()


def test_every_metric_is_reported_over_every_image(result) -> None:
    assert set(result.metrics) == {
        "natural",
        "random",
        "worst_of_k",
        "grid",
        "vote_natural",
        "grid_vote",
        "grid_vote_per_query",
        "grid_vote_transfer",
    }
    assert all(m.total == 80 for m in result.metrics.values())
    assert result.metrics["natural"].correct == 72  # a tenth of the labels were flipped


def test_attacks_never_beat_natural_accuracy(result) -> None:
    acc = {k: v.correct for k, v in result.metrics.items()}
    assert acc["grid"] <= acc["natural"]
    assert acc["grid"] <= acc["worst_of_k"] <= acc["random"]
    assert acc["grid_vote"] <= acc["vote_natural"]
    assert acc["grid_vote"] <= acc["grid_vote_transfer"]


def test_the_ordering_holds_image_by_image(result) -> None:
    p = {k: torch.tensor(v) for k, v in result.per_image.items()}
    assert (p["worst_of_k_correct"] <= p["random_correct"]).all()
    assert (p["grid_robust"] <= p["natural_correct"]).all()


def test_the_grid_means_something_here(result) -> None:
    assert 0 < result.metrics["grid"].correct < result.metrics["natural"].correct


def test_early_exit_and_the_full_grid_agree_image_by_image(device: torch.device) -> None:
    early = run(device, landscape_subset=0)
    full = run(device, early_exit=False)
    for key in (
        "grid_robust",
        "worst_of_k_correct",
        "random_correct",
        "grid_vote_robust",
        "grid_vote_per_query_robust",
        "grid_vote_transfer_correct",
    ):
        assert early.per_image[key] == full.per_image[key], key
    assert early.cost["forward_passes"] < full.cost["forward_passes"]


def test_same_seed_same_numbers() -> None:
    assert run(n=40).per_image == run(n=40).per_image


def test_shards_merge_into_the_whole() -> None:
    # Every subset crosses the boundary between the two shards.
    extra: dict[str, Any] = {
        "landscape_subset": 0,
        "vote_subset": 40,
        "first_order": True,
        "first_order_subset": 30,
        "ablations": frozenset({Ablation.ROTATION_ONLY, Ablation.REFLECTION}),
        "ablation_subset": 35,
    }
    whole = run(n=60, **extra)
    parts = [run(n=60, shard=s, **extra) for s in (range(0, 25), range(25, 60))]
    assert "first_order_correct" in whole.per_image
    assert "ablation_rotation_only_robust" in whole.per_image
    for key, values in whole.per_image.items():
        assert values == parts[0].per_image[key] + parts[1].per_image[key], key


def test_landscape_covers_the_grid_and_agrees_with_per_image_counts(result) -> None:
    land = result.landscape
    assert land["shape"] == [7, 3, 3] and land["images"] == 80
    correct = torch.tensor(land["correct"])
    fool_counts = torch.tensor(result.per_image["grid_fool_count"])
    assert int((80 - correct).sum()) == int(fool_counts.sum())
    robust = torch.tensor(result.per_image["grid_robust"]).bool()
    assert ((fool_counts == 0) == robust).all()
    accuracy = torch.tensor(land["accuracy"])
    assert accuracy[3, 1, 1] == result.metrics["natural"].accuracy  # the identity


def test_landscape_subset_is_recorded_and_limits_exhaustive_work() -> None:
    res = run(landscape_subset=10)
    assert res.landscape["images"] == 10 and res.config["landscape_subset"] == 10
    counts = res.per_image["grid_fool_count"]
    assert all(c >= 0 for c in counts[:10]) and all(c == -1 for c in counts[10:])


def test_vote_subset_is_recorded() -> None:
    res = run(vote_subset=12)
    assert res.metrics["grid_vote"].total == 12 and res.metrics["vote_natural"].total == 12


def test_only_the_requested_metrics_run() -> None:
    res = run(metrics=frozenset({Metric.NATURAL, Metric.GRID}))
    assert set(res.metrics) == {"natural", "grid"}
    assert set(res.forward_passes) == {"natural", "grid", "total"}


def test_progress_is_reported_and_reaches_the_end() -> None:
    seen: list[Progress] = []
    model = tiny_cnn()
    evaluate(Classifier(model, 10), self_labelled(model, 30), BENCH, progress=seen.append)
    fractions = [p.fraction for p in seen]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    assert {p.phase for p in seen} == {
        "natural",
        "worst-of-k",
        "grid",
        "vote",
        "grid+vote",
        "grid+vote per-query",
        "grid+vote transfer",
    }
    assert seen[-1].forward_passes > 0


def test_cancel_stops_the_run() -> None:
    model = tiny_cnn()
    with pytest.raises(EvaluationCancelled):
        evaluate(Classifier(model, 10), self_labelled(model, 30), BENCH, should_stop=lambda: True)


def test_limit_takes_the_first_of_a_fixed_permutation() -> None:
    order = evaluation_order(100, seed=0)
    assert sorted(order.tolist()) == list(range(100))
    assert evaluation_order(100, seed=0, limit=10).tolist() == order[:10].tolist()
    res = run(n=50, limit=20)
    assert res.per_image["index"] == evaluation_order(50, 0)[:20].tolist()


def test_cost_record_is_complete(result) -> None:
    cost = result.cost
    assert cost["forward_passes"] == result.forward_passes["total"] > 0
    assert cost["precision"] == "fp32" and cost["seed"] == 0
    assert {"torch", "torchvision", "python", "spatialbench"} <= set(cost["versions"])
    assert cost["device"].startswith("cpu")


def test_options_take_names_as_json_gives_them_and_refuse_unknown_ones() -> None:
    as_json: dict[str, Any] = {
        "metrics": ["natural", "grid"],
        "vote_protocols": ["transfer"],
        "ablations": ["black-canvas"],
    }
    options = EvalOptions(**as_json)
    assert options.metrics == frozenset({Metric.NATURAL, Metric.GRID})
    assert options.vote_protocols == frozenset({VoteProtocol.TRANSFER})
    assert options.ablations == frozenset({Ablation.BLACK_CANVAS})
    unknown: dict[str, Any] = {"vote_protocols": ["oracle"]}
    with pytest.raises(ValueError, match="known: adaptive, per-query, transfer"):
        EvalOptions(**unknown)


def test_phases_are_named_by_the_enum_in_the_order_they_run() -> None:
    res = run(n=10, first_order=True, ablations=frozenset({Ablation.ROTATION_ONLY}))
    expected = [
        Phase.NATURAL,
        Phase.WORST_OF_K,
        Phase.GRID,
        Phase.VOTE,
        Phase.GRID_VOTE,
        Phase.GRID_VOTE_PER_QUERY,
        Phase.GRID_VOTE_TRANSFER,
        Phase.FIRST_ORDER,
        Phase.ABLATIONS,
    ]
    assert list(res.forward_passes) == [p.value for p in expected] + ["total"]
    assert all(res.forward_passes[p.value] > 0 for p in expected)
    assert res.forward_passes["total"] == sum(res.forward_passes[p.value] for p in expected)
