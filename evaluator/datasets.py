"""The two kinds of dataset the loaders of `evaluator.data` hand out, and the protocol they share.

`TensorImageDataset` holds a small dataset in memory as uint8 (CIFAR-10, MNIST, digits);
`ImageFileDataset` keeps only paths and decodes images batch by batch (ImageNet-sized class
folders). Both answer ``load(indices)`` with float32 images ``(n, C, H, W)`` in ``[0, 1]`` at
the benchmark's channels and image size, and int64 labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from evaluator.errors import DatasetMissingError

__all__ = ["ImageDataset", "TensorImageDataset", "ImageFileDataset"]

# Benchmarks may ask for another channel count than the files hold; grey is ITU-R 601-2 luma,
# the weights PIL's convert("L") uses, so in-memory and decoded datasets agree.
_LUMA = (0.299, 0.587, 0.114)
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
