"""Grid + vote under each attacker model, held to brute-force oracles on a tiny model."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from evaluator.attacks import (
    STREAM_VOTE_GRID,
    STREAM_VOTE_NATURAL,
    Classifier,
    VoteProtocol,
    majority_vote,
)
from evaluator.benchmarks import get_benchmark
from evaluator.evaluate import EvalOptions, Metric, evaluate
from evaluator.transforms import GridSpec, TransformBox, spatial_transform, uniform_transforms
from tests.evaluator.helpers import TensorImages
from tests.evaluator.spatial_models import blobs, lattice_classifier

# Blobs on a lattice classifier: moves change the class near cell borders and not in the
# middle of a cell, so each attacker fools some images and not others.
GRID = GridSpec(TransformBox(15, 1, 1), 7, 3, 3)
BENCH = replace(
    get_benchmark("digits"),
    image_size=(24, 24),
    grid=GRID,
    vote_samples=5,
    vote_subset=None,
    first_order=False,
    ablations=(),
)
VOTE_ONLY = frozenset({Metric.NATURAL, Metric.VOTE})
N = 60


def model_and_data(n: int = N) -> tuple[nn.Module, TensorImages]:
    model = lattice_classifier(8.0)
    return model, blobs(model, n, size=24, spread=9.6)


def vote_of(model: nn.Module, inputs: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """The defended label: ``inputs`` (N, C, H, W), each under its draws (N, k, 3)."""
    n, k = draws.shape[:2]
    repeated = inputs.repeat_interleave(k, dim=0)
    with torch.no_grad():
        logits = model(spatial_transform(repeated, draws.reshape(-1, 3))).view(n, k, -1)
    return majority_vote(logits.argmax(2), logits.softmax(2))


def oracle(model: nn.Module, data: TensorImages, ids: torch.Tensor, protocol: VoteProtocol):
    """Correctness of the defended model under ``protocol``, by brute force."""
    images, labels = data.images[ids], data.labels[ids]
    points = GRID.points()
    fixed = uniform_transforms(GRID.box, 0, STREAM_VOTE_NATURAL, ids, 5)
    if protocol is VoteProtocol.TRANSFER:
        best = []
        with torch.no_grad():
            for x, y in zip(images, labels, strict=True):
                logits = model(spatial_transform(x.expand(len(points), *x.shape), points))
                loss = F.cross_entropy(logits, y.expand(len(points)), reduction="none")
                wrong = logits.argmax(1) != y
                if wrong.any():
                    loss = torch.where(wrong, loss, -torch.inf)
                best.append(int(loss.argmax()))
        attacked = spatial_transform(images, points[torch.tensor(best)])
        return vote_of(model, attacked, fixed) == labels
    columns = []
    for g, point in enumerate(points):
        attacked = spatial_transform(images, point.expand(len(ids), 3))
        if protocol is VoteProtocol.ADAPTIVE:
            draws = fixed
        else:
            draws = uniform_transforms(GRID.box, 0, STREAM_VOTE_GRID, ids, 5, g)
        columns.append(vote_of(model, attacked, draws) == labels)
    return torch.stack(columns, dim=1).all(dim=1)


@pytest.fixture(scope="module")
def setup():
    model, data = model_and_data()
    result = evaluate(Classifier(model, 10, batch_size=100), data, BENCH, EvalOptions(VOTE_ONLY))
    return model, data, result


def per_image(result, key: str) -> torch.Tensor:
    return torch.tensor(result.per_image[key])


@pytest.mark.parametrize(
    ("protocol", "field"),
    [
        (VoteProtocol.ADAPTIVE, "grid_vote_robust"),
        (VoteProtocol.PER_QUERY, "grid_vote_per_query_robust"),
        (VoteProtocol.TRANSFER, "grid_vote_transfer_correct"),
    ],
)
def test_each_protocol_matches_its_brute_force_oracle(setup, protocol, field) -> None:
    model, data, result = setup
    ids = per_image(result, "index")
    expected = oracle(model, data, ids, protocol)
    assert per_image(result, field).tolist() == expected.long().tolist()
    assert 0 < int(expected.sum()) < N  # the oracle separates images here


def test_adaptive_correct_implies_transfer_correct_image_by_image(setup) -> None:
    _, _, result = setup
    adaptive = per_image(result, "grid_vote_robust")
    transfer = per_image(result, "grid_vote_transfer_correct")
    assert ((adaptive == 1) <= (transfer == 1)).all()
    assert int((transfer - adaptive).sum()) > 0  # a transfer attacker really is weaker


def test_adaptive_is_never_above_the_vote_at_the_identity(setup) -> None:
    _, _, result = setup
    adaptive = per_image(result, "grid_vote_robust")
    assert (adaptive <= per_image(result, "vote_natural_correct")).all()


def test_the_fresh_draws_of_per_query_hand_the_attacker_more_chances(setup) -> None:
    _, _, result = setup
    assert result.metrics["grid_vote_per_query"].correct < result.metrics["grid_vote"].correct


def test_each_number_names_its_attacker_and_its_images(setup) -> None:
    _, _, result = setup
    doc = result.to_dict()
    for protocol in VoteProtocol:
        value = doc["metrics"][protocol.metric_key]
        assert value["protocol"] == protocol.value and value["attacker"]
        assert value["images"] == N
    assert doc["config"]["vote_protocols"] == ["adaptive", "per-query", "transfer"]


def test_the_images_behind_a_subset_metric_are_its_own() -> None:
    model, data = model_and_data(30)
    options = EvalOptions(VOTE_ONLY | {Metric.GRID}, vote_subset=7)
    result = evaluate(Classifier(model, 10), data, BENCH, options)
    doc = result.to_dict()
    assert doc["config"]["images"] == 30
    assert doc["config"]["images_per_metric"]["natural"] == 30
    grid_here = sum(result.per_image["grid_robust"][:7]) / 7
    for protocol in VoteProtocol:
        assert doc["metrics"][protocol.metric_key]["images"] == 7
        assert doc["config"]["images_per_metric"][protocol.metric_key] == 7
        assert doc["metrics"][protocol.metric_key]["grid_same_images"] == grid_here


def test_only_the_requested_protocols_run() -> None:
    model, data = model_and_data(10)
    options = EvalOptions(VOTE_ONLY, vote_protocols=frozenset({VoteProtocol.TRANSFER}))
    result = evaluate(Classifier(model, 10), data, BENCH, options)
    assert set(result.metrics) == {"natural", "vote_natural", "grid_vote_transfer"}
    assert set(result.forward_passes) == {"natural", "vote", "grid+vote transfer", "total"}
    assert result.config["vote_protocols"] == ["transfer"]
    assert set(result.per_image["grid_vote_robust"]) == {-1}


def test_the_benchmark_decides_the_protocols_by_default() -> None:
    model, data = model_and_data(10)
    bench = replace(BENCH, vote_protocols=(VoteProtocol.ADAPTIVE,))
    result = evaluate(Classifier(model, 10), data, bench, EvalOptions(VOTE_ONLY))
    assert result.config["vote_protocols"] == ["adaptive"]
    assert "grid_vote" in result.metrics and "grid_vote_per_query" not in result.metrics
