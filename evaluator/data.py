"""Benchmark datasets, read from a data directory in their standard on-disk formats.

Files, relative to the data directory:

- ``cifar10``: ``cifar-10-batches-py/test_batch`` (``data_batch_1`` .. ``_5`` for train) and
  ``batches.meta``, the python release of CIFAR-10 as extracted;
- ``mnist``: ``MNIST/raw/t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte`` (``train-``
  for train), plain or ``.gz``; ``mnist/raw/`` and ``mnist/`` work too;
- ``imagenet``: class folders ``imagenet/val/<wnid>/*.JPEG`` (``imagenet/train/`` for train);
- ``imagefolder``: the benchmark's ``path``, one folder per class, images at any depth below;
- ``digits``: nothing; scikit-learn's bundled copy, with a fixed seeded train/test split.

The data directory is an argument the caller passes (the CLI's ``--data-dir``, the service's
``data_dir`` setting); this module reads no environment variable. None means no data directory:
only datasets that need no files (digits, an imagefolder at an absolute path) load then.
Whatever is missing raises `DatasetMissingError` with a message that says which files go where
(`dataset_help`). Every dataset hands out batches through one method, ``load(indices)``:
float32 images ``(n, C, H, W)`` in ``[0, 1]`` at the benchmark's channels and image size, and
int64 labels. Small datasets are held in memory as uint8; ImageNet-sized ones are decoded
lazily, batch by batch. Nothing here prints, downloads or writes files.

This module chooses and explains; the dataset types are in `evaluator.datasets`, the readers of
each format in `evaluator.dataset_readers`.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from evaluator.benchmarks import BenchmarkSpec, DatasetKind
from evaluator.dataset_readers import (
    IMAGE_EXTENSIONS,
    load_cifar10,
    load_class_folders,
    load_digits,
    load_mnist,
)
from evaluator.datasets import ImageDataset
from evaluator.errors import DatasetMissingError

__all__ = ["load_dataset", "resolve_benchmark", "dataset_help"]

_SPLITS = {
    DatasetKind.CIFAR10: ("test", "train"),
    DatasetKind.MNIST: ("test", "train"),
    DatasetKind.IMAGENET: ("val", "train"),
    DatasetKind.DIGITS: ("test", "train"),
}


def _data_root(data_dir: str | Path | None) -> Path | None:
    return None if data_dir is None else Path(data_dir).expanduser()


def _require_root(spec: BenchmarkSpec, root: Path | None) -> Path:
    if root is None:
        raise DatasetMissingError(f"benchmark {spec.name!r} reads its images from a data directory")
    return root


def load_dataset(spec: BenchmarkSpec, data_dir: str | Path | None = None) -> ImageDataset:
    """The images of ``spec.dataset``'s ``spec.split``, read from ``data_dir`` (None: there is
    none, which only the digits and an imagefolder at an absolute path accept). Raises
    `DatasetMissingError` when files are missing or unreadable, with `dataset_help`'s account
    of where they go, and ValueError for a split or channel count the dataset does not have."""
    if spec.channels not in (1, 3):
        raise ValueError(f"benchmark {spec.name!r}: channels must be 1 or 3, got {spec.channels}")
    allowed = _SPLITS.get(spec.dataset)
    if allowed is not None and spec.split not in allowed:
        raise ValueError(
            f"benchmark {spec.name!r}: {spec.dataset.value} has no split {spec.split!r}; "
            f"splits: {', '.join(allowed)}"
        )
    if spec.resize is not None and spec.resize < max(spec.image_size):
        raise ValueError(
            f"benchmark {spec.name!r}: resize {spec.resize} is smaller than image_size "
            f"{spec.image_size}, so the centre crop would be padded"
        )
    root = _data_root(data_dir)
    try:
        dataset = _read(spec, root)
        if spec.num_classes > 0 and dataset.num_classes != spec.num_classes:
            raise DatasetMissingError(
                f"benchmark {spec.name!r} has {spec.num_classes} classes, but its data has "
                f"{dataset.num_classes}"
            )
    except DatasetMissingError as exc:
        raise DatasetMissingError(f"{exc}.\n{dataset_help(spec, root)}") from exc
    return dataset


def _read(spec: BenchmarkSpec, root: Path | None) -> ImageDataset:
    if spec.dataset is DatasetKind.CIFAR10:
        return load_cifar10(spec, _require_root(spec, root))
    if spec.dataset is DatasetKind.MNIST:
        return load_mnist(spec, _require_root(spec, root))
    if spec.dataset is DatasetKind.IMAGENET:
        return load_class_folders(spec, _require_root(spec, root) / "imagenet" / spec.split)
    if spec.dataset is DatasetKind.IMAGEFOLDER:
        return load_class_folders(spec, _imagefolder_dir(spec, root))
    if spec.dataset is DatasetKind.DIGITS:
        return load_digits(spec)
    raise ValueError(f"unknown dataset kind {spec.dataset!r}")  # pragma: no cover - closed enum


def resolve_benchmark(spec: BenchmarkSpec, dataset: ImageDataset) -> BenchmarkSpec:
    """``spec`` with ``num_classes`` and ``class_names`` taken from the loaded data (an
    ``imagefolder`` benchmark learns its classes only from the folders)."""
    if spec.num_classes > 0 and spec.num_classes != dataset.num_classes:
        raise ValueError(
            f"benchmark {spec.name!r} has {spec.num_classes} classes, the dataset "
            f"{dataset.num_classes}"
        )
    return replace(spec, num_classes=dataset.num_classes, class_names=tuple(dataset.class_names))


def dataset_help(spec: BenchmarkSpec, data_dir: str | Path | None = None) -> str:
    """Where the files of ``spec``'s dataset go in ``data_dir`` and how to obtain them."""
    given = _data_root(data_dir)
    if given is None:
        # The layout below still reads best with a path in it.
        root = Path("DATA_DIR")
        where = "No data directory was given"
    else:
        root = given
        where = f"The data directory is {root}"
        if not root.is_absolute():
            where += f" ({root.absolute()})"
    footer = (
        # The callers' ways of choosing it (evaluator.cli.DATA_DIR_ENV, the service's settings).
        f"{where}; the spatialbench command takes one with --data-dir or the "
        "SPATIALBENCH_DATA_DIR environment variable, the service with its data_dir setting "
        "(the same variable)."
    )
    kind = spec.dataset
    if kind is DatasetKind.CIFAR10:
        batches = root / "cifar-10-batches-py"
        text = (
            f"CIFAR-10 is read from {batches}/: test_batch (test split), data_batch_1 .. "
            "data_batch_5 (train split) and batches.meta (class names), the python version "
            "of the official release. Download cifar-10-python.tar.gz from the CIFAR-10 page "
            f"(https://www.cs.toronto.edu/~kriz/cifar.html) and extract it into {root} "
            f"(tar -xzf cifar-10-python.tar.gz -C {root}), so that {batches / 'test_batch'} "
            f'exists. torchvision.datasets.CIFAR10(root="{root}", download=True) gives the '
            "same layout."
        )
    elif kind is DatasetKind.MNIST:
        raw = root / "MNIST" / "raw"
        text = (
            f"MNIST is read from the raw IDX files in {raw}/ ({root / 'mnist' / 'raw'}/ and "
            f"{root / 'mnist'}/ work too; each file may be gzipped): t10k-images-idx3-ubyte "
            "and t10k-labels-idx1-ubyte (test split), train-images-idx3-ubyte and "
            "train-labels-idx1-ubyte (train split). Download the .gz files from the MNIST "
            "page (http://yann.lecun.com/exdb/mnist/, or the mirror "
            f"https://ossci-datasets.s3.amazonaws.com/mnist/) into {raw}/, so that "
            f"{raw / 't10k-images-idx3-ubyte.gz'} exists; "
            f'torchvision.datasets.MNIST(root="{root}", download=True) gives the same layout.'
        )
    elif kind is DatasetKind.IMAGENET:
        split_dir = root / "imagenet" / spec.split
        text = (
            f"ImageNet is read from class folders {split_dir}/<wnid>/*.JPEG: one folder per "
            "class named by its WordNet id (n01440764, ...), the sorted names giving the class "
            f"index (the standard ILSVRC-2012 order), {spec.num_classes or 'all'} folders. "
            "ILSVRC2012_img_val.tar (from https://image-net.org, registration required) "
            "unpacks into one flat folder; sort it into class folders with the validation "
            "labels, e.g. put ILSVRC2012_img_val.tar and ILSVRC2012_devkit_t12.tar.gz into "
            f'{root / "imagenet"} and run torchvision.datasets.ImageNet(root="'
            f'{root / "imagenet"}", split="val"), which writes {split_dir}/<wnid>/.'
        )
    elif kind is DatasetKind.IMAGEFOLDER:
        folder = _imagefolder_path(spec, root) if spec.path else "<its path, not set>"
        text = (
            f"Benchmark {spec.name!r} reads the class-per-folder directory {folder}/: one "
            "subfolder per class, the sorted folder names giving the class index, images "
            f"({', '.join(IMAGE_EXTENSIONS)}) at any depth below each class folder. The "
            "benchmark's path is taken relative to the data directory unless it is absolute; "
            "a {split} placeholder in it selects the split (needed for a train split)."
        )
    else:
        return (
            "The digits demo uses scikit-learn's bundled copy of the handwritten digits "
            "(sklearn.datasets.load_digits): nothing to download, no data directory needed."
        )
    return f"{text}\n{footer}"


def _imagefolder_path(spec: BenchmarkSpec, root: Path | None) -> Path:
    if not spec.path:
        raise ValueError(f"benchmark {spec.name!r}: an imagefolder benchmark needs a 'path'")
    path = Path(spec.path.replace("{split}", spec.split)).expanduser()
    return path if path.is_absolute() else _require_root(spec, root) / path


def _imagefolder_dir(spec: BenchmarkSpec, root: Path | None) -> Path:
    # Without a {split} placeholder the folder holds the benchmark's evaluation images;
    # handing them out as "train" would let a baseline train on its test set.
    if spec.split == "train" and spec.path and "{split}" not in spec.path:
        raise DatasetMissingError(
            f"benchmark {spec.name!r} has no train split: its path {spec.path!r} names one "
            "folder of evaluation images; write the path with a {split} placeholder",
        )
    return _imagefolder_path(spec, root)
