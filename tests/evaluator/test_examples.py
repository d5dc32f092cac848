"""Example images: the choice of a sharded run, merged, is the single run's choice."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from evaluator.attacks import Classifier
from evaluator.benchmarks import get_benchmark
from evaluator.evaluate import EvalOptions, Metric, evaluate
from evaluator.examples import choose_examples, merge_examples, robust_count, save_examples
from evaluator.transforms import GridSpec, TransformBox
from tests.evaluator.helpers import self_labelled, tiny_cnn

BENCH = replace(
    get_benchmark("digits"),
    image_size=(16, 16),
    grid=GridSpec(TransformBox(30, 3, 3), 7, 3, 3),
    vote_subset=None,
    landscape_subset=None,
    first_order=False,
    ablations=(),
)


def _records(n: int, seed: int) -> dict[str, list[int]]:
    """Per-image records as an evaluation gives them: labels, natural predictions (right
    about half the time) and grid robustness (0 fooled, 1 robust, -1 not measured)."""
    rng = random.Random(seed)
    labels = [rng.randrange(3) for _ in range(n)]
    return {
        "index": [rng.randrange(10_000) for _ in range(n)],
        "label": labels,
        "natural_pred": [lbl if rng.random() < 0.5 else (lbl + 1) % 3 for lbl in labels],
        "grid_robust": [rng.choice((-1, 0, 0, 1)) for _ in range(n)],
    }


def _metadata(per_image: dict[str, list[int]], count: int) -> list[dict[str, Any]]:
    return [
        {"index": per_image["index"][row], "fooled": per_image["grid_robust"][row] == 0}
        for row in choose_examples(per_image, count)
    ]


def _cut(per_image: dict[str, list[int]], stops: list[int]) -> list[dict[str, list[int]]]:
    starts = [0, *stops[:-1]]
    return [{k: v[a:b] for k, v in per_image.items()} for a, b in zip(starts, stops, strict=True)]


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("count", [0, 1, 4, 8])
def test_merged_shard_choices_equal_the_choice_over_all_images(seed: int, count: int) -> None:
    n = 60
    whole = _records(n, seed)
    rng = random.Random(seed)
    stops = sorted(rng.sample(range(1, n), 3)) + [n]
    parts = [_metadata(part, count) for part in _cut(whole, stops)]
    assert merge_examples(parts, count) == _metadata(whole, count)


def test_the_choice_is_the_first_fooled_then_the_first_robust() -> None:
    per_image = {
        "index": [10, 11, 12, 13, 14, 15],
        "label": [1, 1, 1, 1, 1, 1],
        "natural_pred": [1, 2, 1, 1, 1, 1],
        "grid_robust": [0, 0, 1, -1, 0, 1],
    }
    # Row 1 was fooled but misclassified to begin with; row 3 was not measured.
    assert choose_examples(per_image, 2) == [0, 4, 2]
    assert robust_count(2) == 1 and robust_count(8) == 2


def test_a_shards_examples_are_the_single_runs_pixel_for_pixel(
    tmp_path: Path, device: torch.device
) -> None:
    model = tiny_cnn()
    data = self_labelled(model, 80)
    classifier = Classifier(model, 10, device=device, batch_size=128)
    options = EvalOptions(metrics=frozenset({Metric.NATURAL, Metric.GRID}))
    # Of these 80 images three are fooled (the first at positions 0 and 5).
    count = 2

    def examples(shard: range | None, out: Path) -> list[dict[str, Any]]:
        result = evaluate(classifier, data, BENCH, replace(options, shard=shard))
        saved = save_examples(classifier, data, BENCH, result.per_image, out, count)
        return [{**e.to_dict(), "folder": out} for e in saved]

    whole = examples(None, tmp_path / "whole")
    shards = [range(0, 3), range(3, 40), range(40, 80)]
    parts = [examples(shard, tmp_path / f"shard-{n}") for n, shard in enumerate(shards)]
    merged = merge_examples(parts, count)
    assert [e["fooled"] for e in whole] == [True] * count + [False] * robust_count(count)
    assert len({e["folder"] for e in merged}) >= 2  # chosen from more than one shard

    def described(e: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in e.items() if k not in ("original", "transformed", "folder")}

    def pixels(e: dict[str, Any]) -> list[bytes]:
        return [(e["folder"] / e[kind]).read_bytes() for kind in ("original", "transformed")]

    assert [described(e) for e in merged] == [described(e) for e in whole]
    assert [pixels(e) for e in merged] == [pixels(e) for e in whole]
