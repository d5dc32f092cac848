"""The summary of one evaluation: its finished record turned into an `EvaluationResult`.

Every metric is counted from the per-image record (-1: not measured), so a subset metric
reports its own number of images. `first_order_extra` and `grid_same_images` are public
because the merge of shards (`evaluator.shards`) recomputes them from the merged record the
same way, which keeps a sharded result equal to the single run's bit for bit.
"""

from __future__ import annotations

import platform
from typing import Any

import torch
from torch import Tensor

from evaluator.ablations import ablation_variant
from evaluator.options import Metric
from evaluator.results import EvaluationResult, MetricValue
from evaluator.run_state import Run
from evaluator.vocabulary import METRIC_FIELDS, MetricKey, ablation_fields

__all__ = ["first_order_extra", "grid_same_images", "summarise"]


def software_versions() -> dict[str, str]:
    import torchvision

    from evaluator import __version__

    return {
        "spatialbench": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "cuda": torch.version.cuda or "none",
    }


def _measured(values: Tensor) -> MetricValue:
    measured = values >= 0
    return MetricValue(int((values[measured] == 1).sum()), int(measured.sum()))


def _metrics(run: Run) -> dict[str, MetricValue]:
    record, s = run.record, run.settings
    record["natural_correct"] = (record["natural_pred"] == record["label"]).long()
    results: dict[str, MetricValue] = {"natural": _measured(record["natural_correct"])}
    if Metric.RANDOM in s.metrics:
        results["random"] = _measured(record["random_correct"])
    if Metric.WORST_OF_K in s.metrics:
        results["worst_of_k"] = _measured(record["worst_of_k_correct"])
    if Metric.GRID in s.metrics:
        results["grid"] = _measured(record["grid_robust"])
    if Metric.VOTE in s.metrics:
        results["vote_natural"] = _measured(record["vote_natural_correct"])
        for protocol in s.vote_protocols:
            field_name = METRIC_FIELDS[MetricKey(protocol.metric_key)]
            value = _measured(record[field_name])
            value.extra = {"protocol": protocol.value, "attacker": protocol.description}
            value.extra |= _grid_same_images(run, field_name)
            results[protocol.metric_key] = value
    if s.first_order is not None:
        results["first_order"] = _first_order_metric(run)
    return results


def _first_order_metric(run: Run) -> MetricValue:
    """First-order accuracy and, on the same images, the grid's and the gap between them."""
    if run.first_order_error is not None:
        return MetricValue(0, 0, error=run.first_order_error)
    value = _measured(run.record["first_order_correct"])
    value.extra = first_order_extra(value, _grid_same_images(run, "first_order_correct"))
    return value


def first_order_extra(value: MetricValue, same_images: dict[str, float]) -> dict[str, float]:
    """The first-order metric's extras: the grid on the same images and the gap to it."""
    extra = dict(same_images)
    if extra and value.total:
        # Positive: the gradient attack leaves images standing that the grid fools.
        extra["gap_to_grid"] = value.correct / value.total - extra["grid_same_images"]
    return extra


def _grid_same_images(run: Run, field_name: str) -> dict[str, float]:
    if Metric.GRID not in run.settings.metrics:
        return {}
    return grid_same_images(run.record["grid_robust"], run.record[field_name])


def grid_same_images(grid_robust: Tensor, values: Tensor) -> dict[str, float]:
    """Grid accuracy on the images a subset metric measured (``values`` >= 0), so the two
    compare like for like; empty when nothing was measured."""
    measured = values >= 0
    if not bool(measured.any()):
        return {}
    grid = grid_robust[measured]
    return {"grid_same_images": float((grid == 1).sum()) / int(measured.sum())}


def _ablation_records(run: Run) -> dict[str, dict[str, Any]]:
    """Per ablation: its grid, fill and canvas, label, images, correct and accuracy under its
    grid, accuracy at its identity (``natural``; on the canvas this is the padded image) and
    the forward passes it cost (``reused_grid`` when it is the benchmark's own grid)."""
    out: dict[str, dict[str, Any]] = {}
    b = run.benchmark
    for ablation in run.settings.ablations:
        variant = ablation_variant(ablation, b.grid, b.fill)
        robust_field, natural_field = ablation_fields(ablation)
        robust, natural = _measured(run.record[robust_field]), _measured(run.record[natural_field])
        if ablation in run.ablation_errors:
            out[ablation.value] = {**variant.describe(), "error": run.ablation_errors[ablation]}
            continue
        out[ablation.value] = {
            **variant.describe(),
            "images": robust.total,
            "correct": robust.correct,
            "accuracy": robust.accuracy,
            "natural": natural.accuracy,
            "forward_passes": run.ablation_passes[ablation],
            "reused_grid": variant.same_as(b.grid, b.fill) and Metric.GRID in run.settings.metrics,
        }
    return out


def _landscape(run: Run) -> dict[str, Any] | None:
    if Metric.GRID not in run.settings.metrics or not run.landscape_images:
        return None
    grid = run.benchmark.grid
    thetas, dxs, dys = grid.axes()
    correct = run.landscape_correct
    return {
        "shape": list(grid.shape),
        "thetas": thetas.tolist(),
        "dxs": dxs.tolist(),
        "dys": dys.tolist(),
        "images": run.landscape_images,
        "correct": correct.tolist(),
        "accuracy": (correct.double() / run.landscape_images).view(grid.shape).tolist(),
    }


def _config(run: Run, metrics: dict[str, MetricValue]) -> dict[str, Any]:
    s, b = run.settings, run.benchmark
    positions = run.record["position"]
    n = positions.numel()
    return {
        "metrics": sorted(m.value for m in s.metrics),
        "seed": s.seed,
        "limit": run.options.limit,
        "images": n,
        # The images behind each number: a subset metric never borrows the run's count.
        "images_per_metric": {key: value.total for key, value in metrics.items()},
        "positions": [int(positions[0]), int(positions[-1]) + 1] if n else [0, 0],
        "early_exit": run.options.early_exit,
        "worst_of_k": b.worst_of_k,
        "vote_samples": b.vote_samples,
        "vote_subset": s.vote_subset,
        "vote_protocols": [p.value for p in s.vote_protocols] if Metric.VOTE in s.metrics else [],
        "landscape_subset": s.landscape_subset,
        "first_order": None if s.first_order is None else s.first_order.record(b.grid.box),
        "first_order_subset": s.first_order_subset,
        "ablations": [a.value for a in s.ablations],
        "ablation_subset": s.ablation_subset,
        "fill": b.fill.value,
        "grid": list(b.grid.shape),
        "batch_size": run.classifier.batch_size,
    }


def summarise(run: Run, wall: float) -> EvaluationResult:
    metrics = _metrics(run)
    passes = dict(run.passes)
    passes["total"] = sum(passes.values())
    n = run.record["position"].numel()
    cost = {
        "forward_passes": passes["total"],
        "full_grid_forward_passes": n * run.benchmark.grid.size
        if Metric.GRID in run.settings.metrics
        else 0,
        "wall_time_s": wall,
        "device": _device_name(run.classifier.device),
        "precision": run.classifier.precision,
        "versions": software_versions(),
        "seed": run.settings.seed,
    }
    return EvaluationResult(
        benchmark=run.benchmark.to_dict(),
        config=_config(run, metrics),
        metrics=metrics,
        landscape=_landscape(run),
        per_image={key: value.tolist() for key, value in run.record.items()},
        forward_passes=passes,
        cost=cost,
        ablations=_ablation_records(run),
    )


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"
