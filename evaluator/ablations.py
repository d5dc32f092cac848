"""The paper's ablations: the grid attack with one thing changed.

Engstrom et al. (ICML 2019) ask which part of the threat model does the damage: rotations
alone, translations alone, and what the model sees where a move uncovers the border. Each
`Ablation` names one variant of the benchmark's grid attack; any evaluation may request any of
them (`evaluator.evaluate.EvalOptions.ablations`), and each is recorded with its grid shape,
fill and canvas so that its number is never read as the headline grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from torch import Tensor

from evaluator.transforms import FillMode, GridSpec, TransformBox, centre_on_canvas

__all__ = ["Ablation", "AblationVariant", "ablation_variant"]


class Ablation(StrEnum):
    """The variants of the grid attack an evaluation can ask for."""

    ROTATION_ONLY = "rotation-only"
    TRANSLATION_ONLY = "translation-only"
    ZERO_FILL = "zero-fill"
    REFLECTION = "reflection"
    BLACK_CANVAS = "black-canvas"

    @property
    def key(self) -> str:
        """The name as it appears in per-image record fields (underscores)."""
        return self.value.replace("-", "_")


# The side of the black canvas as a multiple of the image's: the authors' 64x64 setting for
# 32x32 CIFAR images, where no move of the box reaches the canvas edge.
CANVAS_FACTOR = 2


@dataclass(frozen=True)
class AblationVariant:
    """One ablation made concrete for a benchmark: the grid it searches, the fill outside the
    image, and the canvas (1 = the image as it is, 2 = centred on a black canvas twice its
    side, which the model then receives)."""

    ablation: Ablation
    grid: GridSpec
    fill: FillMode
    canvas: int
    label: str

    def prepare(self, images: Tensor) -> Tensor:
        """The images the grid moves: as they are, or centred on the canvas."""
        return centre_on_canvas(images, self.canvas) if self.canvas > 1 else images

    def same_as(self, grid: GridSpec, fill: FillMode) -> bool:
        """Whether this variant is exactly the benchmark's own grid attack (its result can
        then be reused rather than recomputed)."""
        return self.canvas == 1 and self.grid == grid and self.fill == fill

    def describe(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "grid": list(self.grid.shape),
            "grid_points": self.grid.size,
            "max_rotation": self.grid.box.max_rotation,
            "max_translation": [self.grid.box.max_dx, self.grid.box.max_dy],
            "fill": self.fill.value,
            "canvas": self.canvas,
        }


def ablation_variant(
    ablation: Ablation | str, grid: GridSpec, fill: FillMode = FillMode.ZEROS
) -> AblationVariant:
    """``ablation`` applied to a benchmark's ``grid`` (31 x 5 x 5 over +-30 deg, +-3 px on
    CIFAR-10): rotation-only keeps the rotations with no translation (31 x 1 x 1),
    translation-only the translations with no rotation (1 x 5 x 5), both with the benchmark's
    ``fill``; the fill variants keep the
    grid and change what is read outside the image; the black canvas keeps the grid and zero
    fill and moves the image centred on a canvas twice its side."""
    ablation = Ablation(ablation)
    box = grid.box
    if ablation is Ablation.ROTATION_ONLY:
        only = GridSpec(TransformBox(box.max_rotation, 0.0, 0.0), grid.n_theta, 1, 1)
        label = f"rotation only ({only.n_theta} x 1 x 1)"
        return AblationVariant(ablation, only, fill, 1, label)
    if ablation is Ablation.TRANSLATION_ONLY:
        only = GridSpec(TransformBox(0.0, box.max_dx, box.max_dy), 1, grid.n_dx, grid.n_dy)
        label = f"translation only (1 x {only.n_dx} x {only.n_dy})"
        return AblationVariant(ablation, only, fill, 1, label)
    if ablation is Ablation.ZERO_FILL:
        return AblationVariant(ablation, grid, FillMode.ZEROS, 1, "zero fill")
    if ablation is Ablation.REFLECTION:
        return AblationVariant(ablation, grid, FillMode.REFLECTION, 1, "reflection fill")
    label = f"black canvas ({CANVAS_FACTOR}x side, zero fill)"
    return AblationVariant(ablation, grid, FillMode.ZEROS, CANVAS_FACTOR, label)
