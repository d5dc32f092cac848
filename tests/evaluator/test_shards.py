"""Shards of one evaluation merge into the whole evaluation, bit for bit."""

import random
from typing import Any

import pytest

from evaluator.ablations import Ablation
from evaluator.shards import MergeError, merge_results, plan_ranges
from tests.evaluator.test_evaluate import run

EVERYTHING: dict[str, Any] = {
    "landscape_subset": 20,
    "vote_subset": 25,
    "first_order": True,
    "first_order_subset": 18,
    "ablations": frozenset({Ablation.ROTATION_ONLY, Ablation.REFLECTION}),
    "ablation_subset": 22,
}
# Every subset ends inside the second shard, so each shard measures a different part of it.
SHARDS = [range(0, 12), range(12, 30), range(30, 40)]
N = 40


def without_wall_time(result: dict[str, Any]) -> dict[str, Any]:
    return {**result, "cost": {k: v for k, v in result["cost"].items() if k != "wall_time_s"}}


@pytest.fixture(scope="module")
def whole_and_parts() -> tuple[dict[str, Any], list[dict[str, Any]]]:
    # Without early exit every image tries every candidate, so even the forward passes of the
    # whole run (one search order across all images) equal the shards' sum.
    whole = run(n=N, early_exit=False, **EVERYTHING).to_dict()
    parts = [run(n=N, early_exit=False, shard=s, **EVERYTHING).to_dict() for s in SHARDS]
    return whole, parts


def test_merged_shards_equal_the_whole_run(whole_and_parts) -> None:
    whole, parts = whole_and_parts
    merged = merge_results(parts)
    assert "first_order" in merged["metrics"] and merged["ablations"]
    assert merged["landscape"]["images"] == N  # no early exit: the whole grid for every image
    for key in ("benchmark", "config", "metrics", "landscape", "ablations", "forward_passes"):
        assert merged[key] == whole[key], key
    assert merged["per_image"] == whole["per_image"]
    assert without_wall_time(merged) == without_wall_time(whole)


def test_the_order_of_the_parts_does_not_matter(whole_and_parts) -> None:
    _, parts = whole_and_parts
    shuffled = list(parts)
    random.Random(3).shuffle(shuffled)
    assert merge_results(shuffled) == merge_results(parts)


def test_an_early_exit_run_merges_into_the_same_numbers() -> None:
    # With early exit each shard searches in an order of its own, so only the forward passes
    # may differ from one run over the whole range.
    parts = [run(n=N, shard=s, **EVERYTHING).to_dict() for s in SHARDS]
    whole = run(n=N, **EVERYTHING).to_dict()
    merged = merge_results(parts)
    for key in ("config", "metrics", "landscape", "per_image"):
        assert merged[key] == whole[key], key


def test_a_missing_shard_is_refused(whole_and_parts) -> None:
    _, parts = whole_and_parts
    with pytest.raises(MergeError, match="do not tile"):
        merge_results([parts[0], parts[2]])


def test_shards_of_different_settings_are_refused(whole_and_parts) -> None:
    _, parts = whole_and_parts
    other = {**parts[1], "config": {**parts[1]["config"], "seed": 99}}
    with pytest.raises(MergeError, match="seed"):
        merge_results([parts[0], other, parts[2]])


@pytest.mark.parametrize(
    ("images", "size", "sizes"),
    [(10, 4, [4, 3, 3]), (10, 10, [10]), (10, 100, [10]), (0, 5, [0]), (7, 1, [1] * 7)],
)
def test_plans_are_consecutive_and_even(images: int, size: int, sizes: list[int]) -> None:
    ranges = plan_ranges(images, size)
    assert [len(r) for r in ranges] == sizes
    assert ranges[0].start == 0 and ranges[-1].stop == images
    assert all(a.stop == b.start for a, b in zip(ranges, ranges[1:], strict=False))
