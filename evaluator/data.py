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
"""

from __future__ import annotations

import gzip
import pickle
import struct
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from evaluator.benchmarks import BenchmarkSpec, DatasetKind
from evaluator.errors import DatasetMissingError

try:  # NumPy 2 moved the module; importing the old name there only warns.
    from numpy._core.multiarray import _reconstruct as _np_reconstruct
except ImportError:  # pragma: no cover - NumPy 1.x
    from numpy.core.multiarray import _reconstruct as _np_reconstruct  # type: ignore[no-redef]

__all__ = [
    "DIGITS_TEST_SIZE",
    "IMAGE_EXTENSIONS",
    "ImageDataset",
    "TensorImageDataset",
    "ImageFileDataset",
    "load_dataset",
    "resolve_benchmark",
    "dataset_help",
    "digits_split",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
DIGITS_TEST_SIZE = 540
# Benchmarks may ask for another channel count than the files hold; grey is ITU-R 601-2 luma,
# the weights PIL's convert("L") uses, so in-memory and decoded datasets agree.
_LUMA = (0.299, 0.587, 0.114)
_CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
_SPLITS = {
    DatasetKind.CIFAR10: ("test", "train"),
    DatasetKind.MNIST: ("test", "train"),
    DatasetKind.IMAGENET: ("val", "train"),
    DatasetKind.DIGITS: ("test", "train"),
}
_DECODE_THREADS = 8


class ImageDataset(Protocol):
    """What the evaluator needs of a dataset: a length, the classes, and batches by index."""

    num_classes: int
    class_names: tuple[str, ...]

    def __len__(self) -> int: ...

    def load(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """float32 images ``(n, C, H, W)`` in ``[0, 1]`` at the benchmark's image size, and
        int64 labels ``(n,)``, for the given integer indices."""
        ...


# ---------------------------------------------------------------------------------------------
# The two dataset classes.
# ---------------------------------------------------------------------------------------------


def _check_indices(indices: Tensor | Sequence[int], length: int) -> Tensor:
    idx = torch.as_tensor(indices).to("cpu")
    if (
        idx.dim() != 1
        or idx.dtype.is_floating_point
        or idx.dtype.is_complex
        or idx.dtype == torch.bool
    ):
        raise TypeError(f"indices must be a 1-d integer tensor, got {idx.dtype} {tuple(idx.shape)}")
    idx = idx.to(torch.int64)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= length):
        raise IndexError(
            f"indices must lie in [0, {length}); got {int(idx.min())}..{int(idx.max())}"
        )
    return idx


def _fit_tensor(
    images: Tensor, channels: int, image_size: tuple[int, int], resize: int | None
) -> Tensor:
    """Float images ``(n, c, h, w)`` to ``channels`` and ``image_size``: a shorter-side resize
    to ``resize`` and a centre crop when ``resize`` is given, else a direct resize. A no-op
    (returning the input) when the images already fit."""
    if images.shape[1] != channels:
        if images.shape[1] == 1 and channels == 3:
            images = images.repeat(1, 3, 1, 1)
        elif images.shape[1] == 3 and channels == 1:
            luma = torch.tensor(_LUMA, dtype=images.dtype).view(1, 3, 1, 1)
            images = (images * luma).sum(dim=1, keepdim=True)
        else:
            raise ValueError(f"cannot convert {images.shape[1]}-channel images to {channels}")
    if images.shape[0] == 0:
        return images.new_zeros((0, channels, *image_size))
    if resize is not None:
        images = TF.resize(images, [resize], InterpolationMode.BILINEAR, antialias=True)
        images = TF.center_crop(images, list(image_size))
    elif tuple(images.shape[-2:]) != tuple(image_size):
        images = TF.resize(images, list(image_size), InterpolationMode.BILINEAR, antialias=True)
    else:
        return images
    # Bilinear weights are convex, but float rounding may step a hair outside [0, 1].
    return images.clamp_(0.0, 1.0)


class TensorImageDataset:
    """A dataset held in memory: uint8 (or float32 in ``[0, 1]``) images ``(n, c, h, w)`` and
    int64 labels. ``load`` converts each batch to float32 and to the benchmark's channels and
    size, so memory holds the compact original."""

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        class_names: Sequence[str],
        *,
        channels: int,
        image_size: tuple[int, int],
        resize: int | None = None,
    ) -> None:
        if images.dim() != 4 or labels.shape != (images.shape[0],):
            raise ValueError(
                f"images must be (n, c, h, w) and labels (n,); got {tuple(images.shape)} and "
                f"{tuple(labels.shape)}"
            )
        self.images = images
        self.labels = labels.to(torch.int64)
        self.class_names = tuple(class_names)
        self.num_classes = len(self.class_names)
        self.channels = channels
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.resize = resize

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def load(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        idx = _check_indices(indices, len(self))
        batch = self.images[idx]
        if batch.dtype == torch.uint8:
            batch = batch.to(torch.float32).div_(255.0)
        else:
            batch = batch.to(torch.float32)
        return _fit_tensor(batch, self.channels, self.image_size, self.resize), self.labels[idx]


class ImageFileDataset:
    """A dataset of image files decoded on demand with PIL; only the paths stay in memory.

    Each image is converted to ``"RGB"`` or ``"L"``, then either resized so that its shorter
    side is ``resize`` and centre-cropped to ``image_size`` (the usual ImageNet evaluation
    preprocessing, done on the PIL image as torchvision's reference pipeline does) or, without
    ``resize``, resized directly to ``image_size``. Bilinear with antialiasing throughout.
    """

    def __init__(
        self,
        paths: Sequence[Path],
        labels: Sequence[int],
        class_names: Sequence[str],
        *,
        channels: int,
        image_size: tuple[int, int],
        resize: int | None = None,
        num_threads: int = _DECODE_THREADS,
    ) -> None:
        if len(paths) != len(labels):
            raise ValueError(f"{len(paths)} paths but {len(labels)} labels")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        self.paths = tuple(Path(p) for p in paths)
        self.labels = torch.as_tensor(list(labels), dtype=torch.int64)
        self.class_names = tuple(class_names)
        self.num_classes = len(self.class_names)
        self.channels = channels
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.resize = resize
        self.num_threads = max(1, num_threads)

    def __len__(self) -> int:
        return len(self.paths)

    def read_image(self, path: Path) -> Tensor:
        """One image as uint8 ``(C, H, W)`` at the dataset's channels and size."""
        try:
            with Image.open(path) as opened:
                image = opened.convert("L" if self.channels == 1 else "RGB")
        except (OSError, Image.DecompressionBombError) as exc:
            raise DatasetMissingError(
                f"cannot decode image {path}: {exc}; replace or remove the file"
            ) from exc
        size = list(self.image_size)
        if self.resize is not None:
            image = TF.resize(image, [self.resize], InterpolationMode.BILINEAR, antialias=True)
            image = TF.center_crop(image, size)
        elif (image.height, image.width) != self.image_size:
            image = TF.resize(image, size, InterpolationMode.BILINEAR, antialias=True)
        return TF.pil_to_tensor(image)

    def load(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        idx = _check_indices(indices, len(self))
        paths = [self.paths[i] for i in idx.tolist()]
        if not paths:
            return torch.zeros((0, self.channels, *self.image_size)), self.labels[idx]
        if len(paths) == 1 or self.num_threads == 1:
            decoded = [self.read_image(p) for p in paths]
        else:
            # PIL releases the GIL while decoding and resampling, so threads scale.
            with ThreadPoolExecutor(max_workers=min(self.num_threads, len(paths))) as pool:
                decoded = list(pool.map(self.read_image, paths))
        return torch.stack(decoded).to(torch.float32).div_(255.0), self.labels[idx]


# ---------------------------------------------------------------------------------------------
# Entry points.
# ---------------------------------------------------------------------------------------------


def _data_root(data_dir: str | Path | None) -> Path | None:
    return None if data_dir is None else Path(data_dir).expanduser()


def _require_root(spec: BenchmarkSpec, root: Path | None) -> Path:
    if root is None:
        raise _missing(
            spec, None, f"benchmark {spec.name!r} reads its images from a data directory"
        )
    return root


def load_dataset(spec: BenchmarkSpec, data_dir: str | Path | None = None) -> ImageDataset:
    """The images of ``spec.dataset``'s ``spec.split``, read from ``data_dir`` (None: there is
    none, which only the digits and an imagefolder at an absolute path accept). Raises
    `DatasetMissingError` when files are missing or unreadable, ValueError for a split or
    channel count the dataset does not have."""
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
    dataset: ImageDataset
    if spec.dataset is DatasetKind.CIFAR10:
        dataset = _load_cifar10(spec, _require_root(spec, root))
    elif spec.dataset is DatasetKind.MNIST:
        dataset = _load_mnist(spec, _require_root(spec, root))
    elif spec.dataset is DatasetKind.IMAGENET:
        folder = _require_root(spec, root) / "imagenet" / spec.split
        dataset = _load_folders(spec, root, folder)
    elif spec.dataset is DatasetKind.IMAGEFOLDER:
        dataset = _load_folders(spec, root, _imagefolder_dir(spec, root))
    elif spec.dataset is DatasetKind.DIGITS:
        images, labels = digits_split(spec.split)
        dataset = _in_memory(spec, images, labels, tuple(str(d) for d in range(10)))
    else:  # pragma: no cover - DatasetKind is closed
        raise ValueError(f"unknown dataset kind {spec.dataset!r}")
    if spec.num_classes > 0 and dataset.num_classes != spec.num_classes:
        raise _missing(
            spec,
            root,
            f"benchmark {spec.name!r} has {spec.num_classes} classes, but its data has "
            f"{dataset.num_classes}",
        )
    return dataset


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


def _missing(spec: BenchmarkSpec, root: Path | None, problem: str) -> DatasetMissingError:
    return DatasetMissingError(f"{problem}.\n{dataset_help(spec, root)}")


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


def _read_cifar_batch(spec: BenchmarkSpec, root: Path, path: Path) -> tuple[Tensor, Tensor]:
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
        raise _missing(spec, root, f"{path} is not a CIFAR-10 python batch ({exc})") from exc
    # Each row is 1024 red, 1024 green, then 1024 blue bytes, each plane row-major 32x32.
    images = torch.from_numpy(np.ascontiguousarray(data).reshape(-1, 3, 32, 32).copy())
    return images, torch.from_numpy(labels)


def _cifar_class_names(spec: BenchmarkSpec, root: Path, path: Path) -> tuple[str, ...]:
    if not path.is_file():
        return _CIFAR10_CLASSES  # only names; the labels do not depend on them
    try:
        names = tuple(
            n.decode("utf-8") if isinstance(n, bytes) else str(n)
            for n in _unpickle_cifar(path)["label_names"]
        )
    except Exception as exc:  # as above: any failure means a foreign or damaged file
        raise _missing(spec, root, f"{path} is not CIFAR-10's batches.meta ({exc})") from exc
    if len(names) != len(_CIFAR10_CLASSES):
        raise _missing(spec, root, f"{path} names {len(names)} classes, CIFAR-10 has 10")
    return names


def _load_cifar10(spec: BenchmarkSpec, root: Path) -> TensorImageDataset:
    folder = root / "cifar-10-batches-py"
    names = ["test_batch"] if spec.split == "test" else [f"data_batch_{i}" for i in range(1, 6)]
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        listed = ", ".join(str(folder / name) for name in missing)
        raise _missing(spec, root, f"CIFAR-10 ({spec.split} split): {listed} not found")
    parts = [_read_cifar_batch(spec, root, folder / name) for name in names]
    images = torch.cat([p[0] for p in parts])
    labels = torch.cat([p[1] for p in parts])
    class_names = _cifar_class_names(spec, root, folder / "batches.meta")
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


def _load_mnist(spec: BenchmarkSpec, root: Path) -> TensorImageDataset:
    prefix = "t10k" if spec.split == "test" else "train"
    names = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
    found = [_find_mnist_file(root, name) for name in names]
    missing = [name for name, path in zip(names, found, strict=True) if path is None]
    if missing:
        raw = root / "MNIST" / "raw"
        listed = ", ".join(str(raw / name) for name in missing)
        raise _missing(spec, root, f"MNIST ({spec.split} split): {listed} (or .gz) not found")
    image_path, label_path = (p for p in found if p is not None)
    try:
        images, labels = _read_idx(image_path), _read_idx(label_path)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(f"images {images.shape} and labels {labels.shape} do not fit")
        if labels.size and labels.max() > 9:
            raise ValueError("labels outside 0..9")
    except (OSError, EOFError, ValueError) as exc:
        raise _missing(
            spec, root, f"{image_path} and {label_path} are not an MNIST IDX pair ({exc})"
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


def _imagefolder_path(spec: BenchmarkSpec, root: Path | None) -> Path:
    if not spec.path:
        raise ValueError(f"benchmark {spec.name!r}: an imagefolder benchmark needs a 'path'")
    path = Path(spec.path.replace("{split}", spec.split)).expanduser()
    return path if path.is_absolute() else _require_root(spec, root) / path


def _imagefolder_dir(spec: BenchmarkSpec, root: Path | None) -> Path:
    # Without a {split} placeholder the folder holds the benchmark's evaluation images;
    # handing them out as "train" would let a baseline train on its test set.
    if spec.split == "train" and spec.path and "{split}" not in spec.path:
        raise _missing(
            spec,
            root,
            f"benchmark {spec.name!r} has no train split: its path {spec.path!r} names one "
            "folder of evaluation images; write the path with a {split} placeholder",
        )
    return _imagefolder_path(spec, root)


def _load_folders(spec: BenchmarkSpec, root: Path | None, folder: Path) -> ImageFileDataset:
    if not folder.is_dir():
        raise _missing(spec, root, f"{spec.title} ({spec.split} split): {folder} not found")
    # Hidden folders (.ipynb_checkpoints, .DS_Store's kin) are never classes.
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise _missing(spec, root, f"{folder} has no class folders")
    if spec.num_classes > 0 and len(classes) != spec.num_classes:
        raise _missing(
            spec,
            root,
            f"{folder} has {len(classes)} class folders, benchmark {spec.name!r} has "
            f"{spec.num_classes} classes",
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
            raise _missing(
                spec,
                root,
                f"class folder {folder / name} has no {'/'.join(IMAGE_EXTENSIONS)} images",
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
