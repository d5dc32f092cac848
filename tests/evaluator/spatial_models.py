"""Models whose decisions move with the image in a known way, for attack oracles."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tests.evaluator.helpers import TensorImages


def pixel_coordinates(height: int, width: int) -> tuple[Tensor, Tensor]:
    """Pixel centres about the image centre, x right and y down, in pixels."""
    ys = torch.arange(height, dtype=torch.float32) + 0.5 - height / 2
    xs = torch.arange(width, dtype=torch.float32) + 0.5 - width / 2
    return ys.view(-1, 1).expand(height, width), xs.view(1, -1).expand(height, width)


class CentroidClassifier(nn.Module):
    """Classifies an image by where its brightness centre lies: the logit of class ``k`` is
    minus the squared distance (pixels) from the intensity centroid to ``centres[k]``.
    Rotating or translating the image moves the centroid with the content, so which moves
    change the class is known in closed form."""

    def __init__(self, centres: Tensor) -> None:
        super().__init__()
        self.register_buffer("centres", centres.float())

    def forward(self, x: Tensor) -> Tensor:
        weight = x.sum(dim=1)
        ys, xs = pixel_coordinates(*x.shape[-2:])
        total = weight.sum(dim=(1, 2)) + 1e-6
        cx = (weight * xs.to(x.device)).sum(dim=(1, 2)) / total
        cy = (weight * ys.to(x.device)).sum(dim=(1, 2)) / total
        centres: Tensor = self.centres  # type: ignore[assignment]
        return -((cx[:, None] - centres[:, 0]) ** 2 + (cy[:, None] - centres[:, 1]) ** 2)


def lattice_classifier(spacing: float = 6.0) -> CentroidClassifier:
    """Nine classes on a 3 x 3 lattice of centres ``spacing`` pixels apart, and a tenth that
    is never the nearest."""
    grid = torch.tensor([-spacing, 0.0, spacing])
    centres = torch.cartesian_prod(grid, grid)
    return CentroidClassifier(torch.cat([centres, torch.tensor([[1e3, 1e3]])])).eval()


def blobs(
    model: nn.Module, n: int, size: int = 24, spread: float = 8.0, sigma: float = 1.5, seed: int = 0
) -> TensorImages:
    """Gaussian blobs at uniform positions within ``spread`` pixels of the centre, labelled by
    the model, with a tenth of the labels flipped."""
    generator = torch.Generator().manual_seed(seed)
    where = (torch.rand(n, 2, generator=generator) * 2 - 1) * spread
    ys, xs = pixel_coordinates(size, size)
    d2 = (xs - where[:, 0, None, None]) ** 2 + (ys - where[:, 1, None, None]) ** 2
    images = torch.exp(-d2 / (2 * sigma**2))[:, None].expand(n, 3, size, size).contiguous()
    with torch.no_grad():
        labels = model(images).argmax(dim=1)
    flip = torch.arange(n) % 10 == 3
    labels[flip] = (labels[flip] + 1) % 10
    return TensorImages(images, labels)
