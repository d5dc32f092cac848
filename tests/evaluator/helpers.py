"""Small typed factories for evaluator tests."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class TensorImages:
    """An in-memory `ImageDataset` over given tensors."""

    def __init__(self, images: Tensor, labels: Tensor, num_classes: int = 10) -> None:
        self.images, self.labels, self.num_classes = images, labels, num_classes
        self.class_names = tuple(str(i) for i in range(num_classes))

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        return self.images[indices], self.labels[indices]


def tiny_cnn(num_classes: int = 10, channels: int = 3, seed: int = 0) -> nn.Sequential:
    """A fixed random CNN whose decisions move when the image moves."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(channels, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 8 * 8, num_classes),
    ).eval()


def self_labelled(model: nn.Module, n: int, size: int = 16, seed: int = 1) -> TensorImages:
    """Random images labelled by the model itself, with a tenth of the labels flipped: natural
    accuracy is exactly 90%, and transformed images are fooled now and then."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, size, size, generator=generator)
    with torch.no_grad():
        labels = model(images).argmax(dim=1)
    flip = torch.arange(n) % 10 == 3
    labels[flip] = (labels[flip] + 1) % 10
    return TensorImages(images, labels)
