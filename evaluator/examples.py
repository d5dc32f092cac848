"""Example images: which images an evaluation shows, and how they are rendered.

An evaluation shows the first ``count`` images the grid attack fooled (among those the model
classified correctly untransformed) and the first ``max(1, count // 4)`` it did not fool, in
the fixed evaluation order. Each becomes a pair of PNGs, the original and the image
transformed at its first fooling grid point (or at the grid's far corner for a robust one),
upscaled with nearest neighbours so that a 32x32 image can be seen on a page.

Because the choice is "the first ones in position order", a sharded evaluation chooses the
same examples as a single run: each shard chooses its own first ones, and `merge_examples`
keeps the first ones across shards (`choose_examples` on the concatenated records equals
`merge_examples` of the shards' choices). The choosing and merging need no torch, so the
worker may merge the shards' examples without loading it; rendering imports it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor

    from evaluator.attacks import Classifier
    from evaluator.benchmarks import BenchmarkSpec
    from evaluator.evaluate import ImageDataset

__all__ = [
    "ExampleImage",
    "choose_examples",
    "merge_examples",
    "robust_count",
    "save_examples",
    "upscaled_png",
]

# Smallest side, in pixels, of a saved example.
MIN_DISPLAY_SIZE = 128


def robust_count(count: int) -> int:
    """How many images the attack did not fool are shown next to ``count`` fooled ones."""
    return max(1, count // 4)


@dataclass(frozen=True)
class ExampleImage:
    """One saved example: the image (``index`` in the dataset), its label, the model's natural
    prediction, whether the grid attack fooled it, the transformation shown (degrees,
    pixels) and the model's prediction there, and the file names of the two PNGs."""

    index: int
    label: int
    pred: int
    fooled: bool
    point: tuple[float, float, float]
    fool_pred: int
    original: str
    transformed: str
    label_name: str | None = None
    fool_pred_name: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values; ``point`` as ``{"theta", "dx", "dy"}``, names left out when
        the benchmark has none."""
        theta, dx, dy = self.point
        out: dict[str, Any] = {
            "index": self.index,
            "label": self.label,
            "pred": self.pred,
            "fooled": self.fooled,
            "point": {"theta": theta, "dx": dx, "dy": dy},
            "fool_pred": self.fool_pred,
            "original": self.original,
            "transformed": self.transformed,
        }
        if self.label_name is not None:
            out["label_name"] = self.label_name
        if self.fool_pred_name is not None:
            out["fool_pred_name"] = self.fool_pred_name
        return out


def choose_examples(per_image: dict[str, list[int]], count: int) -> list[int]:
    """Rows of ``per_image`` to show: the first ``count`` fooled ones (naturally correct, not
    grid-robust), then the first `robust_count` robust ones, each in row order."""
    robust = per_image.get("grid_robust", [])
    natural_ok = [
        p == lbl for p, lbl in zip(per_image["natural_pred"], per_image["label"], strict=True)
    ]
    fooled_rows = [i for i, r in enumerate(robust) if r == 0 and natural_ok[i]][:count]
    robust_rows = [i for i, r in enumerate(robust) if r == 1][: robust_count(count)]
    return fooled_rows + robust_rows


def merge_examples(parts: Sequence[Sequence[dict[str, Any]]], count: int) -> list[dict[str, Any]]:
    """The examples a single run over all the shards' images would have chosen, from each
    shard's own choice (``parts`` in shard order, each as `ExampleImage.to_dict` lists it,
    fooled ones first): the first ``count`` fooled ones across shards, then the first
    `robust_count` robust ones. The dicts are returned as given, so keys a caller added
    (where a shard stored its PNGs, say) come along."""
    fooled = [e for part in parts for e in part if e["fooled"]][:count]
    robust = [e for part in parts for e in part if not e["fooled"]][: robust_count(count)]
    return fooled + robust


def upscaled_png(image: Tensor, path: Path, min_size: int = MIN_DISPLAY_SIZE) -> None:
    """Write ``image`` (``(C, H, W)`` in [0, 1], C of 1 or 3) as a PNG whose longer side is at
    least ``min_size``, scaled by a whole factor so each pixel stays a sharp square."""
    import torch.nn.functional as F
    from PIL import Image

    h, w = image.shape[-2:]
    factor = max(1, math.ceil(min_size / max(h, w)))
    big = F.interpolate(image[None], scale_factor=factor, mode="nearest")[0]
    array = (big.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    if array.shape[2] == 1:
        array = array[:, :, 0]
    Image.fromarray(array).save(path, format="PNG")


def _name(names: Sequence[str], label: int, unknown: str) -> str | None:
    """The class name of ``label`` (``unknown`` past the names), or None without names."""
    if not names:
        return None
    return (names[label] if label < len(names) else unknown)[:100]


def save_examples(
    classifier: Classifier,
    dataset: ImageDataset,
    spec: BenchmarkSpec,
    per_image: dict[str, list[int]],
    out: Path,
    count: int,
) -> list[ExampleImage]:
    """Render the examples `choose_examples` picks from ``per_image`` (an evaluation's
    records) into ``out`` as ``NN_original.png`` and ``NN_transformed.png``, numbered from
    00 in the order chosen; returns their metadata."""
    import torch

    from evaluator.transforms import spatial_transform

    rows = choose_examples(per_image, count)
    if not rows:
        return []
    out.mkdir(parents=True, exist_ok=True)
    robust = per_image["grid_robust"]
    points = spec.grid.points()
    corner = points.abs().sum(dim=1).argmax()
    indices = torch.tensor([per_image["index"][i] for i in rows])
    images, _labels = dataset.load(indices)
    params = torch.stack(
        [
            points[per_image["grid_fool_point"][i]] if robust[i] == 0 else points[corner]
            for i in rows
        ]
    )
    moved = spatial_transform(images, params, spec.fill)
    predictions = classifier.logits(moved.to(classifier.device)).argmax(dim=1)
    names = spec.class_names
    examples = []
    for n, row in enumerate(rows):
        original, transformed = f"{n:02d}_original.png", f"{n:02d}_transformed.png"
        upscaled_png(images[n], out / original)
        upscaled_png(moved[n], out / transformed)
        label, fool_pred = int(per_image["label"][row]), int(predictions[n])
        theta, dx, dy = (float(v) for v in params[n])
        examples.append(
            ExampleImage(
                index=int(per_image["index"][row]),
                label=label,
                pred=int(per_image["natural_pred"][row]),
                fooled=robust[row] == 0,
                point=(theta, dx, dy),
                fool_pred=fool_pred,
                original=original,
                transformed=transformed,
                label_name=_name(names, label, str(label)),
                fool_pred_name=_name(names, fool_pred, ""),
            )
        )
    return examples
