"""Benchmarks: a dataset and split, an image size, the transformation box and grid, defaults.

The built-in benchmarks follow DESIGN.md; an operator adds more with a TOML file (see
`load_benchmark_file`), for example an ``imagefolder`` benchmark over any class-per-folder
directory.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

from evaluator.ablations import Ablation
from evaluator.attacks import VoteProtocol
from evaluator.errors import UnknownBenchmarkError
from evaluator.transforms import FillMode, GridSpec, TransformBox
from evaluator.vocabulary import BenchmarkCounts

E = TypeVar("E", bound=StrEnum)

__all__ = [
    "DatasetKind",
    "BenchmarkSpec",
    "BUILTIN_BENCHMARKS",
    "get_benchmark",
    "list_benchmarks",
    "load_benchmark_file",
    "benchmark_from_mapping",
]


class DatasetKind(StrEnum):
    """The on-disk formats we read (see `evaluator.data`)."""

    CIFAR10 = "cifar10"
    IMAGENET = "imagenet"
    MNIST = "mnist"
    DIGITS = "digits"
    IMAGEFOLDER = "imagefolder"


# The landscape subset of a benchmark defined without one (a TOML table, the CLI's
# imagefolder): the full grid for every image would cost images x grid points forward passes
# (387,500 for 500 images), the rest of the evaluation usually a few percent of that.
DEFAULT_LANDSCAPE_SUBSET = 100


@dataclass(frozen=True)
class BenchmarkSpec:
    """Everything that fixes what a number on the leaderboard means.

    ``vote_subset`` and ``landscape_subset`` bound how many images (the first of the fixed
    evaluation order) the expensive metrics use; None means all. They are stored with every
    result and shown next to the number.

    The service's defaults for the optional measurements: ``vote_protocols`` (the attacker
    models grid + vote is measured under; all three unless a benchmark says otherwise),
    ``first_order`` (the gradient attack, on ``first_order_subset`` images) and ``ablations``
    (on ``ablation_subset`` images). An evaluation may ask for others.
    """

    name: str
    title: str
    dataset: DatasetKind
    split: str
    num_classes: int
    channels: int
    image_size: tuple[int, int]
    grid: GridSpec
    fill: FillMode = FillMode.ZEROS
    seed: int = 0
    worst_of_k: int = 10
    vote_samples: int = 10
    vote_subset: int | None = None
    landscape_subset: int | None = None
    vote_protocols: tuple[VoteProtocol, ...] = tuple(VoteProtocol)
    first_order: bool = False
    first_order_subset: int | None = None
    ablations: tuple[Ablation, ...] = ()
    ablation_subset: int | None = None
    # imagefolder: the directory (relative to the data directory, or absolute).
    path: str | None = None
    # ImageNet-style preprocessing: resize the shorter side, then centre-crop to image_size.
    resize: int | None = None
    class_names: tuple[str, ...] = field(default=(), compare=False)
    description: str = ""

    @property
    def box(self) -> TransformBox:
        return self.grid.box

    @property
    def counts(self) -> BenchmarkCounts:
        """The numbers of this benchmark that the metrics' texts state."""
        return BenchmarkCounts(self.worst_of_k, self.grid.size, self.vote_samples)

    def to_dict(self) -> dict[str, Any]:
        b = self.grid.box
        return {
            "name": self.name,
            "title": self.title,
            "dataset": self.dataset.value,
            "split": self.split,
            "num_classes": self.num_classes,
            "channels": self.channels,
            "image_size": list(self.image_size),
            "max_rotation": b.max_rotation,
            "max_translation": [b.max_dx, b.max_dy],
            "grid": list(self.grid.shape),
            "grid_points": self.grid.size,
            "fill": self.fill.value,
            "seed": self.seed,
            "worst_of_k": self.worst_of_k,
            "vote_samples": self.vote_samples,
            "vote_subset": self.vote_subset,
            "landscape_subset": self.landscape_subset,
            "vote_protocols": [p.value for p in self.vote_protocols],
            "first_order": self.first_order,
            "first_order_subset": self.first_order_subset,
            "ablations": [a.value for a in self.ablations],
            "ablation_subset": self.ablation_subset,
            "description": self.description,
        }


def _grid(rotation: float, translation: float) -> GridSpec:
    return GridSpec(TransformBox(rotation, translation, translation), 31, 5, 5)


BUILTIN_BENCHMARKS: dict[str, BenchmarkSpec] = {
    spec.name: spec
    for spec in (
        BenchmarkSpec(
            name="cifar10",
            title="CIFAR-10",
            dataset=DatasetKind.CIFAR10,
            split="test",
            num_classes=10,
            channels=3,
            image_size=(32, 32),
            grid=_grid(30.0, 3.0),
            vote_subset=1000,
            landscape_subset=1000,
            description="CIFAR-10 test split, 10,000 images, 32x32.",
        ),
        BenchmarkSpec(
            name="imagenet",
            title="ImageNet",
            dataset=DatasetKind.IMAGENET,
            split="val",
            num_classes=1000,
            channels=3,
            image_size=(224, 224),
            resize=256,
            grid=_grid(30.0, 24.0),
            vote_subset=1000,
            landscape_subset=1000,
            description="ImageNet validation set, 50,000 images, Resize 256 + CenterCrop 224.",
        ),
        BenchmarkSpec(
            name="mnist",
            title="MNIST",
            dataset=DatasetKind.MNIST,
            split="test",
            num_classes=10,
            channels=1,
            image_size=(28, 28),
            grid=_grid(30.0, 3.0),
            vote_subset=1000,
            landscape_subset=1000,
            description="MNIST test split, 10,000 images, 28x28 grey.",
        ),
        BenchmarkSpec(
            name="digits",
            title="Digits (demo)",
            dataset=DatasetKind.DIGITS,
            split="test",
            num_classes=10,
            channels=3,
            image_size=(32, 32),
            grid=_grid(30.0, 3.0),
            # Small enough that the demo's three baselines finish in minutes on 2 CPU cores.
            vote_subset=50,
            landscape_subset=100,
            first_order=True,
            first_order_subset=200,
            ablations=tuple(Ablation),
            ablation_subset=100,
            description=(
                "scikit-learn's bundled 8x8 digits, upscaled to 3x32x32; a fixed test split "
                "of 540 images. Runs in minutes on a CPU."
            ),
        ),
    )
}


def list_benchmarks(extra: Mapping[str, BenchmarkSpec] | None = None) -> list[BenchmarkSpec]:
    return list({**BUILTIN_BENCHMARKS, **(extra or {})}.values())


def get_benchmark(name: str, extra: Mapping[str, BenchmarkSpec] | None = None) -> BenchmarkSpec:
    """The benchmark called ``name``: built-in, or one of ``extra`` (from operator config)."""
    known = {**BUILTIN_BENCHMARKS, **(extra or {})}
    try:
        return known[name]
    except KeyError:
        raise UnknownBenchmarkError(
            f"unknown benchmark {name!r}; known benchmarks: {', '.join(sorted(known))}"
        ) from None


def benchmark_from_mapping(name: str, table: Mapping[str, Any]) -> BenchmarkSpec:
    """A benchmark from a TOML table. Keys: ``dataset`` (required), ``path``, ``num_classes``,
    ``image_size`` ([H, W] or one number), ``channels``, ``max_rotation``, ``max_translation``
    (pixels; one number or [dx, dy]), ``grid`` ([n_theta, n_dx, n_dy]), ``fill``, ``seed``,
    ``worst_of_k``, ``vote_samples``, ``vote_subset``, ``landscape_subset`` (default
    `DEFAULT_LANDSCAPE_SUBSET` images unless a ``base`` gives one), ``vote_protocols`` (a list
    of adaptive, per-query, transfer), ``first_order`` (true or false), ``first_order_subset``,
    ``ablations`` (a list of `Ablation` names), ``ablation_subset``, ``resize``, ``split``,
    ``title``, ``description``. A built-in name as ``base`` starts from that one."""
    allowed = {
        "dataset", "path", "num_classes", "image_size", "channels", "max_rotation",
        "max_translation", "grid", "fill", "seed", "worst_of_k", "vote_samples", "vote_subset",
        "landscape_subset", "vote_protocols", "first_order", "first_order_subset", "ablations",
        "ablation_subset", "resize", "split", "title", "description", "base",
    }  # fmt: skip
    unknown = set(table) - allowed
    if unknown:
        raise ValueError(
            f"benchmark {name!r}: unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}"
        )
    base = get_benchmark(table["base"]) if "base" in table else None
    if base is None and "dataset" not in table:
        raise ValueError(
            f"benchmark {name!r}: give 'dataset' (one of {[d.value for d in DatasetKind]})"
        )
    dataset = DatasetKind(table["dataset"]) if "dataset" in table else base.dataset  # type: ignore[union-attr]
    size = table.get("image_size", base.image_size if base else 32)
    image_size = (
        (int(size), int(size)) if isinstance(size, int | float) else (int(size[0]), int(size[1]))
    )
    old_box = base.grid.box if base else TransformBox()
    rotation = float(table.get("max_rotation", old_box.max_rotation))
    translation = table.get("max_translation", [old_box.max_dx, old_box.max_dy])
    tx, ty = (translation, translation) if isinstance(translation, int | float) else translation
    counts = table.get("grid", list(base.grid.shape) if base else [31, 5, 5])
    grid = GridSpec(TransformBox(rotation, float(tx), float(ty)), *(int(c) for c in counts))
    fields: dict[str, Any] = {
        "name": name,
        "title": table.get("title", name),
        "dataset": dataset,
        "split": table.get("split", base.split if base else "test"),
        "num_classes": int(table.get("num_classes", base.num_classes if base else 0)),
        "channels": int(table.get("channels", base.channels if base else 3)),
        "image_size": image_size,
        "grid": grid,
        "description": table.get("description", ""),
    }
    for key in ("seed", "worst_of_k", "vote_samples", "vote_subset", "landscape_subset",
                "first_order", "first_order_subset", "ablation_subset", "resize",
                "path"):  # fmt: skip
        if key in table:
            fields[key] = table[key]
    if "fill" in table:
        fields["fill"] = FillMode(table["fill"])
    if "vote_protocols" in table:
        fields["vote_protocols"] = _names(name, "vote_protocols", table, VoteProtocol)
    if "ablations" in table:
        fields["ablations"] = _names(name, "ablations", table, Ablation)
    if base is None and "landscape_subset" not in table:
        # The landscape costs the whole grid for every image it covers, early exit or not.
        fields["landscape_subset"] = DEFAULT_LANDSCAPE_SUBSET
    if dataset is DatasetKind.IMAGEFOLDER and not fields.get("path", base.path if base else None):
        raise ValueError(f"benchmark {name!r}: an imagefolder benchmark needs 'path'")
    if base is not None:
        return replace(base, **fields)
    if dataset is not DatasetKind.IMAGEFOLDER and fields["num_classes"] <= 0:
        raise ValueError(f"benchmark {name!r}: give num_classes")
    return BenchmarkSpec(**fields)


def _names(name: str, key: str, table: Mapping[str, Any], kind: type[E]) -> tuple[E, ...]:
    """A list of names from a closed vocabulary, in the vocabulary's own order."""
    values = table[key]
    if isinstance(values, str):
        values = [values]
    known = [e.value for e in kind]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"benchmark {name!r}: unknown {key} {unknown}; known: {known}")
    return tuple(e for e in kind if e.value in values)


def load_benchmark_file(path: str | Path) -> dict[str, BenchmarkSpec]:
    """Benchmarks from a TOML file of ``[benchmarks.NAME]`` tables."""
    with open(path, "rb") as fh:
        doc = tomllib.load(fh)
    tables = doc.get("benchmarks", {})
    if not isinstance(tables, dict) or not tables:
        raise ValueError(f"{path}: expected one or more [benchmarks.NAME] tables")
    return {name: benchmark_from_mapping(name, table) for name, table in tables.items()}
