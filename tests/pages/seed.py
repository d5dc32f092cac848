"""Plausible evaluation data for the page tests and screenshots.

Made up, not measured: a landscape whose accuracy falls off with rotation and translation the
way the paper's plots do, fool counts to match, and example images from scikit-learn's digits
(the demo benchmark's data) moved by the real `spatial_transform`.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

THETAS = [-30.0 + 2.0 * i for i in range(31)]
SHIFTS = [-3.0, -1.5, 0.0, 1.5, 3.0]


def landscape(
    natural: float = 0.95, sensitivity: float = 1.0, images: int = 540,
    thetas: list[float] = THETAS, shifts: list[float] = SHIFTS,
) -> dict[str, Any]:  # fmt: skip
    """A landscape over ``thetas`` x ``shifts`` x ``shifts`` (the digits benchmark's 31 x 5 x 5
    by default): ``natural`` at the identity, lower away from it."""
    acc = [
        [
            [
                round(
                    natural * math.exp(-sensitivity * ((t / 30) ** 2 * 1.2 + (dx**2 + dy**2) / 30)),
                    4,
                )
                for dy in shifts
            ]
            for dx in shifts
        ]
        for t in thetas
    ]
    correct = [round(a * images) for plane in acc for row in plane for a in row]
    return {
        "shape": [len(thetas), len(shifts), len(shifts)],
        "thetas": thetas,
        "dxs": shifts,
        "dys": shifts,
        "images": images,
        "correct": correct,
        "accuracy": acc,
    }


def per_image(
    images: int = 540, robust: float = 0.3, seed: int = 0, grid_points: int = 775
) -> dict[str, Any]:
    """Per-image records with ``grid_fool_count`` (the last 40 outside the landscape subset)."""
    rng = random.Random(seed)
    counts = []
    for i in range(images):
        if i >= images - 40:
            counts.append(-1)
        elif rng.random() < robust:
            counts.append(0)
        else:
            # A mean of 120 fooling points on the 775-point grid, in proportion on others.
            counts.append(min(grid_points, int(rng.expovariate(775 / (120 * grid_points))) + 1))
    return {
        "index": list(range(images)),
        "grid_fool_count": counts,
    }


def write_examples(storage_dir: Path, submission_id: str, count: int = 4) -> list[dict[str, Any]]:
    """PNGs as the worker stores them (``examples/<id>/NN_original.png`` ...) and the
    ``Evaluation.examples`` metadata that points at them."""
    import torch
    from PIL import Image
    from sklearn.datasets import load_digits

    from evaluator.transforms import spatial_transform

    digits = load_digits()
    folder = storage_dir / "examples" / submission_id
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for n in range(count):
        index = 7 + 13 * n
        label = int(digits.target[index])
        image = torch.tensor(digits.images[index], dtype=torch.float32)[None, None] / 16
        image = torch.nn.functional.interpolate(image, size=(32, 32), mode="bilinear")
        fooled = n < count - 1
        point = (-30.0 + 8 * n, 3.0 if n % 2 else -1.5, 1.5) if fooled else (30.0, 3.0, 3.0)
        moved = spatial_transform(image, torch.tensor([point]))
        names = {}
        for kind, tensor in (("original", image), ("transformed", moved)):
            array = (tensor[0, 0].clamp(0, 1) * 255).round().byte().numpy()
            name = f"{n:02d}_{kind}.png"
            Image.fromarray(array).resize((96, 96), Image.Resampling.NEAREST).save(folder / name)
            names[kind] = f"examples/{submission_id}/{name}"
        out.append(
            {
                "index": index,
                "label": label,
                "pred": label,
                "fooled": fooled,
                "point": {"theta": point[0], "dx": point[1], "dy": point[2]},
                "fool_pred": (label + 3) % 10 if fooled else label,
                **names,
            }
        )
    return out


def evaluation_fields(
    natural: float, random_: float, worst: float, grid: float, vote: float, grid_vote: float,
    *, sensitivity: float = 1.0, seed: int = 0,
) -> dict[str, Any]:  # fmt: skip
    """Keyword arguments for ``create_evaluation`` with a full record."""
    images = 540
    metrics = {
        key: {"accuracy": value, "correct": round(value * images), "total": images}
        for key, value in (
            ("natural", natural), ("random", random_), ("worst_of_k", worst), ("grid", grid),
            ("vote_natural", vote), ("grid_vote", grid_vote),
        )
    }  # fmt: skip
    return {
        "natural": natural,
        "random": random_,
        "worst_of_k": worst,
        "grid": grid,
        "vote_natural": vote,
        "grid_vote": grid_vote,
        "images": images,
        "metrics": metrics,
        "landscape": landscape(natural, sensitivity, images - 40),
        "per_image": per_image(images, robust=grid, seed=seed),
        "forward_passes": 183_245,
        "wall_time_s": 42.5,
        "device": "cpu (test)",
        "precision": "fp32",
        "seed": 0,
        "versions": {"python": "3.11", "torch": "2.14.1", "spatialbench": "0.1.0"},
        "config": {
            "grid": [31, 5, 5],
            "seed": 0,
            "images": images,
            "early_exit": True,
            "worst_of_k": 10,
            "vote_samples": 10,
            "vote_subset": None,
            "landscape_subset": images - 40,
            "fill": "zeros",
            "limit": None,
        },  # fmt: skip
        "cost": {
            "forward_passes": 183_245,
            "full_grid_forward_passes": images * 775,
            "forward_passes_by_phase": {
                "natural": 540,
                "random": 540,
                "worst_of_k": 5_400,
                "grid": 95_165,
                "vote": 81_600,
                "total": 183_245,
            },  # fmt: skip
        },
    }


VOTE_ATTACKERS = {
    "adaptive": "The vote's draws for an image are fixed; the attacker searches every grid point.",
    "per-query": "Fresh vote draws at every grid point.",
    "transfer": "The attacker picks the undefended model's worst point; the vote decides once.",
}


def fidelity_fields(
    base: dict[str, Any], *, per_query: float, transfer: float, first_order: float | None,
    first_order_error: str | None = None, vote_images: int = 50, subset: int = 60,
) -> dict[str, Any]:  # fmt: skip
    """``base`` (from `evaluation_fields`) with what the evaluator now also records: grid +
    vote under its three attacker models on ``vote_images`` images, first-order (or the
    reason it could not run) and the ablations on ``subset`` images, as the worker stores
    them (the ablations under ``config["ablation_results"]``)."""
    fields = {**base, "metrics": dict(base["metrics"]), "config": dict(base["config"])}
    grid = base["grid"]
    for key, protocol, value in (
        ("grid_vote", "adaptive", base["grid_vote"]),
        ("grid_vote_per_query", "per-query", per_query),
        ("grid_vote_transfer", "transfer", transfer),
    ):
        correct = round(value * vote_images)
        fields["metrics"][key] = {
            "accuracy": correct / vote_images, "correct": correct, "total": vote_images,
            "images": vote_images, "protocol": protocol, "attacker": VOTE_ATTACKERS[protocol],
            "grid_same_images": grid,
        }  # fmt: skip
    fields["grid_vote"] = fields["metrics"]["grid_vote"]["accuracy"]
    if first_order_error is not None:
        fields["metrics"]["first_order"] = {
            "accuracy": None, "correct": 0, "total": 0, "images": 0, "error": first_order_error
        }  # fmt: skip
        fields["first_order"] = None
    elif first_order is not None:
        correct = round(first_order * subset)
        fields["metrics"]["first_order"] = {
            "accuracy": correct / subset, "correct": correct, "total": subset, "images": subset,
            "grid_same_images": grid, "gap_to_grid": correct / subset - grid,
        }  # fmt: skip
        fields["first_order"] = correct / subset
    fields["config"].update(
        vote_subset=vote_images,
        vote_protocols=list(VOTE_ATTACKERS),
        images_per_metric={k: v["total"] for k, v in fields["metrics"].items()},
        ablations=["rotation-only", "translation-only", "black-canvas"],
        ablation_subset=subset,
        ablation_results={
            "rotation-only": _ablation("rotation only (31 x 1 x 1)", [31, 1, 1], "zeros", 1,
                                       subset, grid + 0.1),
            "translation-only": _ablation("translation only (1 x 5 x 5)", [1, 5, 5], "zeros", 1,
                                          subset, grid + 0.2),
            "black-canvas": _ablation("black canvas (2x side, zero fill)", [31, 5, 5], "zeros",
                                      2, subset, grid - 0.02),
        },
    )  # fmt: skip
    return fields


def _ablation(
    label: str, grid: list[int], fill: str, canvas: int, images: int, accuracy: float
) -> dict[str, Any]:
    correct = round(min(1.0, max(0.0, accuracy)) * images)
    return {
        "label": label, "grid": grid, "grid_points": grid[0] * grid[1] * grid[2],
        "max_rotation": 30.0 if grid[0] > 1 else 0.0,
        "max_translation": [3.0, 3.0] if grid[1] > 1 else [0.0, 0.0], "fill": fill,
        "canvas": canvas, "images": images, "correct": correct, "accuracy": correct / images,
        "natural": 0.95, "forward_passes": images * grid[0] * grid[1] * grid[2],
        "reused_grid": False,
    }  # fmt: skip
