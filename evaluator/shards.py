"""One evaluation cut into shards, and the shards' results merged back into one.

A shard is a range of positions in the evaluation's fixed order (`evaluator.evaluate.
evaluation_order`); `evaluate` with ``EvalOptions(shard=...)`` evaluates just that range, with
state of its own (the search's candidate order starts afresh in every shard). An evaluation
is defined by its shard plan: run one shard after another in one process or each on another
machine, and `merge_results` gives the same result, bit for bit (wall time aside, which is
summed).

Every count is a sum; every accuracy is recomputed from the merged counts the way `evaluate`
computes it (so the floats are the very same); the per-image records are concatenated in
position order; the landscape's counts are summed over the shards that measured it. Pure
Python: the worker merges, and the worker process imports no torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from evaluator.results import MetricValue
from evaluator.vocabulary import METRIC_FIELDS, MetricKey, ablation_fields

__all__ = ["MergeError", "merge_results", "plan_ranges"]

# Extras of a metric that are the same in every shard (the vote's attacker model).
_CONSTANT_EXTRAS = ("protocol", "attacker")
# Config entries that differ between shards and are recomputed by the merge.
_PER_SHARD_CONFIG = ("images", "images_per_metric", "positions")
# Cost entries that are summed.
_SUMMED_COST = ("forward_passes", "full_grid_forward_passes", "wall_time_s")


class MergeError(ValueError):
    """The parts are not the shards of one evaluation."""


def plan_ranges(images: int, shard_images: int) -> list[range]:
    """Positions ``0..images`` in consecutive ranges of at most ``shard_images``, as even as
    possible (sizes differ by at most one)."""
    if shard_images < 1:
        raise ValueError(f"shard_images must be at least 1, not {shard_images}")
    count = max(1, math.ceil(images / shard_images))
    base, extra = divmod(images, count)
    ranges, start = [], 0
    for i in range(count):
        stop = start + base + (1 if i < extra else 0)
        ranges.append(range(start, stop))
        start = stop
    return ranges


def merge_results(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The ``EvaluationResult.to_dict()`` of the whole evaluation, from its shards' (in any
    order). Raises `MergeError` unless they are consecutive shards of the same evaluation."""
    if not parts:
        raise MergeError("no shard results to merge")
    parts = sorted(parts, key=lambda p: int(p["config"]["positions"][0]))
    first = parts[0]
    _check_same(parts)
    per_image = _merge_per_image(parts)
    metrics = _merge_metrics(parts, per_image)
    passes = _sum_dicts([p["forward_passes"] for p in parts])
    config = dict(first["config"])
    config["images"] = sum(int(p["config"]["images"]) for p in parts)
    config["images_per_metric"] = {key: value["total"] for key, value in metrics.items()}
    config["positions"] = [first["config"]["positions"][0], parts[-1]["config"]["positions"][1]]
    cost = dict(first["cost"])
    for key in _SUMMED_COST:
        cost[key] = sum(p["cost"][key] for p in parts)
    devices = sorted({str(p["cost"]["device"]) for p in parts})
    cost["device"] = devices[0] if len(devices) == 1 else "; ".join(devices)
    return {
        "benchmark": first["benchmark"],
        "config": config,
        "metrics": metrics,
        "landscape": _merge_landscape([p["landscape"] for p in parts]),
        "ablations": _merge_ablations(parts, per_image),
        "forward_passes": passes,
        "cost": cost,
        "per_image": per_image,
    }


def _check_same(parts: Sequence[dict[str, Any]]) -> None:
    first = parts[0]
    constant = {k: v for k, v in first["config"].items() if k not in _PER_SHARD_CONFIG}
    for part in parts[1:]:
        if part["benchmark"] != first["benchmark"]:
            raise MergeError("the shards were evaluated on different benchmarks")
        other = {k: v for k, v in part["config"].items() if k not in _PER_SHARD_CONFIG}
        if other != constant:
            changed = sorted(k for k in constant.keys() | other.keys()
                             if constant.get(k) != other.get(k))  # fmt: skip
            raise MergeError(f"the shards were evaluated with different settings: {changed}")
        if set(part["metrics"]) != set(first["metrics"]):
            raise MergeError("the shards measured different metrics")
    for before, after in zip(parts, parts[1:], strict=False):
        if before["config"]["positions"][1] != after["config"]["positions"][0]:
            raise MergeError(
                f"the shards do not tile the evaluation order: {before['config']['positions']} "
                f"is followed by {after['config']['positions']}"
            )


def _merge_per_image(parts: Sequence[dict[str, Any]]) -> dict[str, list[int]]:
    keys = list(parts[0]["per_image"])
    if any(list(p["per_image"]) != keys for p in parts):
        raise MergeError("the shards recorded different per-image fields")
    return {key: [v for p in parts for v in p["per_image"][key]] for key in keys}


def _merge_metrics(
    parts: Sequence[dict[str, Any]], per_image: dict[str, list[int]]
) -> dict[str, dict[str, Any]]:
    merged: dict[str, dict[str, Any]] = {}
    grid_ran = MetricKey.GRID in parts[0]["metrics"]
    for key, value in parts[0]["metrics"].items():
        errors = [p["metrics"][key] for p in parts if p["metrics"][key].get("error")]
        if errors:
            merged[key] = errors[0]
            continue
        metric = MetricValue(
            correct=sum(int(p["metrics"][key]["correct"]) for p in parts),
            total=sum(int(p["metrics"][key]["total"]) for p in parts),
        )
        extra = {k: value[k] for k in _CONSTANT_EXTRAS if k in value}
        same: dict[str, float] = {}
        if grid_ran and key in METRIC_FIELDS and "grid_same_images" in _union_keys(parts, key):
            same = _grid_same_images(per_image["grid_robust"], per_image[METRIC_FIELDS[key]])
        extra |= same
        if key == MetricKey.FIRST_ORDER and same and metric.total:
            # As `evaluator.summary.first_order_extra` computes it.
            extra["gap_to_grid"] = metric.correct / metric.total - same["grid_same_images"]
        metric.extra = extra
        merged[key] = metric.to_dict()
    return merged


def _grid_same_images(grid_robust: list[int], values: list[int]) -> dict[str, float]:
    """As `evaluator.summary.grid_same_images` computes it, on the merged lists."""
    measured = [grid for grid, value in zip(grid_robust, values, strict=True) if value >= 0]
    if not measured:
        return {}
    return {"grid_same_images": float(sum(1 for g in measured if g == 1)) / len(measured)}


def _union_keys(parts: Sequence[dict[str, Any]], key: str) -> set[str]:
    return {k for p in parts for k in p["metrics"][key]}


def _merge_landscape(parts: Sequence[dict[str, Any] | None]) -> dict[str, Any] | None:
    measured = [p for p in parts if p is not None]
    if not measured:
        return None
    first = measured[0]
    images = sum(int(p["images"]) for p in measured)
    correct = [sum(column) for column in zip(*(p["correct"] for p in measured), strict=True)]
    # Each accuracy is one float64 division of two integers, as the evaluator's tensor
    # division is: the same value bit for bit.
    accuracy: list[Any] = [c / images for c in correct]
    for size in reversed(first["shape"][1:]):
        accuracy = [accuracy[i : i + size] for i in range(0, len(accuracy), size)]
    return {
        "shape": first["shape"],
        "thetas": first["thetas"],
        "dxs": first["dxs"],
        "dys": first["dys"],
        "images": images,
        "correct": correct,
        "accuracy": accuracy,
    }


def _merge_ablations(
    parts: Sequence[dict[str, Any]], per_image: dict[str, list[int]]
) -> dict[str, dict[str, Any]]:
    merged: dict[str, dict[str, Any]] = {}
    for name, record in parts[0]["ablations"].items():
        records = [p["ablations"][name] for p in parts]
        errors = [r for r in records if "error" in r]
        if errors:
            merged[name] = errors[0]
            continue
        robust = MetricValue(
            correct=sum(int(r["correct"]) for r in records),
            total=sum(int(r["images"]) for r in records),
        )
        natural = _accuracy_of(per_image, ablation_fields(name)[1])
        merged[name] = {
            **record,
            "images": robust.total,
            "correct": robust.correct,
            "accuracy": robust.accuracy,
            "natural": natural,
            "forward_passes": sum(int(r["forward_passes"]) for r in records),
        }
    return merged


def _accuracy_of(per_image: dict[str, list[int]], field_name: str) -> float | None:
    """An ablation's accuracy at its identity, from the merged per-image field."""
    if field_name not in per_image:
        raise MergeError(f"no per-image field {field_name}")
    values = [v for v in per_image[field_name] if v >= 0]
    return MetricValue(sum(1 for v in values if v == 1), len(values)).accuracy


def _sum_dicts(dicts: Sequence[dict[str, int]]) -> dict[str, int]:
    keys = list(dicts[0])
    if any(list(d) != keys for d in dicts):
        raise MergeError("the shards ran different phases")
    return {key: sum(int(d[key]) for d in dicts) for key in keys}
