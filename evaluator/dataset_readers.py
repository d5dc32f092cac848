"""Readers of the standard on-disk formats: CIFAR-10's python batches, MNIST's IDX files,
class-per-folder images (ImageNet's ``val/`` and any imagefolder benchmark), and
scikit-learn's bundled digits.

Each reader takes the benchmark and where its files are, checks what it reads, and returns a
dataset of `evaluator.datasets`; a missing or unreadable file raises `DatasetMissingError`
naming the problem, to which `evaluator.data.load_dataset` adds where the files should go.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from evaluator.benchmarks import BenchmarkSpec
from evaluator.datasets import ImageFileDataset, TensorImageDataset
from evaluator.errors import DatasetMissingError

try:  # NumPy 2 moved the module; importing the old name there only warns.
    from numpy._core.multiarray import _reconstruct as _np_reconstruct
except ImportError:  # pragma: no cover - NumPy 1.x
    from numpy.core.multiarray import _reconstruct as _np_reconstruct  # type: ignore[no-redef]

__all__ = [
    "DIGITS_TEST_SIZE",
    "IMAGE_EXTENSIONS",
    "load_cifar10",
    "load_mnist",
    "load_class_folders",
    "load_digits",
    "digits_split",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
DIGITS_TEST_SIZE = 540
_CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip


def _in_memory(
    spec: BenchmarkSpec, images: Tensor, labels: Tensor, class_names: Sequence[str]
) -> TensorImageDataset:
    return TensorImageDataset(
        images,
        labels,
        class_names,
        channels=spec.channels,
        image_size=spec.image_size,
        resize=spec.resize,
    )


# ---------------------------------------------------------------------------------------------
# CIFAR-10: the python release's pickled batches.
# ---------------------------------------------------------------------------------------------

# The official CIFAR-10 batches are pickles (Python 2 era dicts holding a NumPy array), and
# plain pickle.load runs whatever callable a file names. The data directory is chosen by the
# operator, but a swapped or damaged file should fail, not execute: rebuilding a NumPy array
# needs exactly these callables, and nothing else is resolved.
_CIFAR_PICKLE_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _np_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _np_reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _NumpyArrayUnpickler(pickle.Unpickler):
    """An unpickler that can rebuild dicts, lists, strings, numbers and NumPy arrays only."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _CIFAR_PICKLE_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refused to load global {module}.{name}: a CIFAR-10 batch holds only NumPy "
                "arrays, lists and strings"
            ) from None


def _unpickle_cifar(path: Path) -> dict[str, Any]:
    with open(path, "rb") as fh:
        # encoding="bytes": the files were written by Python 2, whose str is bytes.
        obj = _NumpyArrayUnpickler(fh, encoding="bytes").load()
    if not isinstance(obj, dict):
        raise ValueError(f"expected a dict, got {type(obj).__name__}")
    return {k.decode("latin-1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def _read_cifar_batch(path: Path) -> tuple[Tensor, Tensor]:
    try:
        batch = _unpickle_cifar(path)
        if "data" not in batch or "labels" not in batch:
            raise ValueError(f"no 'data' and 'labels' entries (keys: {sorted(batch)})")
        data, labels = batch["data"], np.asarray(batch["labels"], dtype=np.int64)
        if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2):
            raise ValueError("'data' is not a uint8 matrix")
        if data.shape[1] != 3 * 32 * 32 or labels.shape != (data.shape[0],):
            raise ValueError(f"'data' {data.shape} and 'labels' {labels.shape} do not fit")
        if labels.size and (labels.min() < 0 or labels.max() >= len(_CIFAR10_CLASSES)):
            raise ValueError("labels outside 0..9")
    # A damaged or foreign pickle can fail in many ways (bad opcodes, refused globals, wrong
    # contents); each means the same to the operator: this file is not a CIFAR-10 batch.
    except Exception as exc:
        raise DatasetMissingError(f"{path} is not a CIFAR-10 python batch ({exc})") from exc
    # Each row is 1024 red, 1024 green, then 1024 blue bytes, each plane row-major 32x32.
    images = torch.from_numpy(np.ascontiguousarray(data).reshape(-1, 3, 32, 32).copy())
    return images, torch.from_numpy(labels)


def _cifar_class_names(path: Path) -> tuple[str, ...]:
    if not path.is_file():
        return _CIFAR10_CLASSES  # only names; the labels do not depend on them
    try:
        names = tuple(
            n.decode("utf-8") if isinstance(n, bytes) else str(n)
            for n in _unpickle_cifar(path)["label_names"]
        )
    except Exception as exc:  # as above: any failure means a foreign or damaged file
        raise DatasetMissingError(f"{path} is not CIFAR-10's batches.meta ({exc})") from exc
    if len(names) != len(_CIFAR10_CLASSES):
        raise DatasetMissingError(f"{path} names {len(names)} classes, CIFAR-10 has 10")
    return names


def load_cifar10(spec: BenchmarkSpec, root: Path) -> TensorImageDataset:
    """CIFAR-10's ``spec.split`` from ``root/cifar-10-batches-py/``."""
    folder = root / "cifar-10-batches-py"
    names = ["test_batch"] if spec.split == "test" else [f"data_batch_{i}" for i in range(1, 6)]
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        listed = ", ".join(str(folder / name) for name in missing)
        raise DatasetMissingError(f"CIFAR-10 ({spec.split} split): {listed} not found")
    parts = [_read_cifar_batch(folder / name) for name in names]
    images = torch.cat([p[0] for p in parts])
    labels = torch.cat([p[1] for p in parts])
    class_names = _cifar_class_names(folder / "batches.meta")
    return _in_memory(spec, images, labels, class_names)


# ---------------------------------------------------------------------------------------------
# MNIST: raw IDX files.
# ---------------------------------------------------------------------------------------------


def _find_mnist_file(root: Path, name: str) -> Path | None:
    for folder in (root / "MNIST" / "raw", root / "mnist" / "raw", root / "mnist", root / "MNIST"):
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file of unsigned bytes (magic ``00 00 08 ndim``, big-endian uint32 dims)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08" or raw[3] == 0:
        raise ValueError(f"bad magic number {raw[:4].hex()} (expected 000008 + ndim)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError("truncated header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    if len(raw) - header != int(np.prod(dims)):
        raise ValueError(f"{len(raw) - header} data bytes for dimensions {dims}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


def load_mnist(spec: BenchmarkSpec, root: Path) -> TensorImageDataset:
    """MNIST's ``spec.split`` from the IDX files under ``root`` (see `_find_mnist_file`)."""
    prefix = "t10k" if spec.split == "test" else "train"
    names = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
    found = [_find_mnist_file(root, name) for name in names]
    missing = [name for name, path in zip(names, found, strict=True) if path is None]
    if missing:
        raw = root / "MNIST" / "raw"
        listed = ", ".join(str(raw / name) for name in missing)
        raise DatasetMissingError(f"MNIST ({spec.split} split): {listed} (or .gz) not found")
    image_path, label_path = (p for p in found if p is not None)
    try:
        images, labels = _read_idx(image_path), _read_idx(label_path)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(f"images {images.shape} and labels {labels.shape} do not fit")
        if labels.size and labels.max() > 9:
            raise ValueError("labels outside 0..9")
    except (OSError, EOFError, ValueError) as exc:
        raise DatasetMissingError(
            f"{image_path} and {label_path} are not an MNIST IDX pair ({exc})"
        ) from exc
    return _in_memory(
        spec,
        torch.from_numpy(images).unsqueeze(1),
        torch.from_numpy(labels.astype(np.int64)),
        tuple(str(d) for d in range(10)),
    )


# ---------------------------------------------------------------------------------------------
# Class-per-folder datasets: ImageNet's val/ and any imagefolder benchmark.
# ---------------------------------------------------------------------------------------------


def load_class_folders(spec: BenchmarkSpec, folder: Path) -> ImageFileDataset:
    """One class per subfolder of ``folder``, the sorted names giving the class index."""
    if not folder.is_dir():
        raise DatasetMissingError(f"{spec.title} ({spec.split} split): {folder} not found")
    # Hidden folders (.ipynb_checkpoints, .DS_Store's kin) are never classes.
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DatasetMissingError(f"{folder} has no class folders")
    if spec.num_classes > 0 and len(classes) != spec.num_classes:
        raise DatasetMissingError(
            f"{folder} has {len(classes)} class folders, benchmark {spec.name!r} has "
            f"{spec.num_classes} classes"
        )
    paths: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        files = sorted(
            p
            for p in (folder / name).rglob("*")
            if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
        )
        if not files:
            raise DatasetMissingError(
                f"class folder {folder / name} has no {'/'.join(IMAGE_EXTENSIONS)} images"
            )
        paths.extend(files)
        labels.extend([label] * len(files))
    return ImageFileDataset(
        paths,
        labels,
        classes,
        channels=spec.channels,
        image_size=spec.image_size,
        resize=spec.resize,
    )


# ---------------------------------------------------------------------------------------------
# Digits: scikit-learn's bundled 8x8 digits, the demo benchmark.
# ---------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _digits_all() -> tuple[Tensor, Tensor, Tensor]:
    from sklearn.datasets import load_digits  # imported here: sklearn is slow to import

    digits = load_digits()
    grey = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
    grey = torch.nn.functional.interpolate(
        grey, size=(32, 32), mode="bilinear", align_corners=False
    )
    labels = torch.from_numpy(digits.target.astype(np.int64))
    # RandomState, not default_rng: NumPy freezes RandomState's stream across versions, and
    # the split must never move under a published number.
    order = torch.from_numpy(np.random.RandomState(0).permutation(len(labels)))
    return grey, labels, order


def digits_split(split: str) -> tuple[Tensor, Tensor]:
    """scikit-learn's digits as float32 images ``(n, 3, 32, 32)`` in ``[0, 1]`` and int64
    labels: 8x8 values 0..16 scaled to ``[0, 1]``, upscaled bilinearly (``align_corners=False``)
    and repeated to 3 channels. A seeded permutation (seed 0) of the 1797 images fixes the
    split: the last 540 are ``"test"``, the first 1257 ``"train"``. Fresh tensors each call."""
    grey, labels, order = _digits_all()
    if split == "test":
        chosen = order[-DIGITS_TEST_SIZE:]
    elif split == "train":
        chosen = order[:-DIGITS_TEST_SIZE]
    else:
        raise ValueError(f"digits has splits 'train' and 'test', not {split!r}")
    return grey[chosen].repeat(1, 3, 1, 1), labels[chosen]


def load_digits(spec: BenchmarkSpec) -> TensorImageDataset:
    """The ``spec.split`` of scikit-learn's digits (see `digits_split`) at the benchmark's size."""
    images, labels = digits_split(spec.split)
    return _in_memory(spec, images, labels, tuple(str(d) for d in range(10)))
