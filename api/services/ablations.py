"""The ablations of a stored evaluation, as the model page and the API show them.

An evaluation stores the checked result's ``ablations`` records under ``config`` key
``ablation_results`` when the worker keeps them; otherwise they are rebuilt from what every
stored evaluation has: the names asked for (``config["ablations"]``), the benchmark's grid and
fill (``config["benchmark"]``) and the per-image columns ``ablation_<name>_robust`` /
``ablation_<name>_natural`` (1 correct, 0 fooled, -1 not measured).
"""

from __future__ import annotations

from typing import Any

from db.models import Evaluation
from evaluator.ablations import Ablation, ablation_variant
from evaluator.transforms import FillMode, GridSpec, TransformBox
from evaluator.vocabulary import ablation_fields

__all__ = ["evaluation_ablations"]


def evaluation_ablations(evaluation: Evaluation) -> dict[str, Any]:
    """Per ablation name: ``{label, grid, grid_points, max_rotation, max_translation, fill,
    canvas, images, correct, accuracy, natural}``; empty for evaluations without any."""
    config = evaluation.config if isinstance(evaluation.config, dict) else {}
    stored = config.get("ablation_results")
    if isinstance(stored, dict):
        return stored
    return _rebuilt(config, evaluation.per_image)


def _rebuilt(config: dict[str, Any], per_image: Any) -> dict[str, Any]:
    names = config.get("ablations")
    benchmark = config.get("benchmark")
    if not names or not isinstance(benchmark, dict) or not isinstance(per_image, dict):
        return {}
    grid = _grid(benchmark)
    fill = FillMode(benchmark.get("fill", FillMode.ZEROS.value))
    out: dict[str, Any] = {}
    for name in names:
        ablation = Ablation(name)
        robust_field, natural_field = ablation_fields(ablation)
        robust = per_image.get(robust_field)
        natural = per_image.get(natural_field)
        if not isinstance(robust, list):
            continue
        images, correct = _counts(robust)
        natural_images, natural_correct = _counts(natural if isinstance(natural, list) else [])
        out[ablation.value] = {
            **ablation_variant(ablation, grid, fill).describe(),
            "images": images,
            "correct": correct,
            "accuracy": correct / images if images else None,
            "natural": natural_correct / natural_images if natural_images else None,
        }
    return out


def _grid(benchmark: dict[str, Any]) -> GridSpec:
    n_theta, n_dx, n_dy = benchmark["grid"]
    max_dx, max_dy = benchmark["max_translation"]
    box = TransformBox(float(benchmark["max_rotation"]), float(max_dx), float(max_dy))
    return GridSpec(box, int(n_theta), int(n_dx), int(n_dy))


def _counts(column: list[Any]) -> tuple[int, int]:
    """(images measured, images correct) of a per-image flag column."""
    measured = [v for v in column if v in (0, 1)]
    return len(measured), sum(measured)
