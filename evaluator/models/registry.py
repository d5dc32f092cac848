"""The registry of architectures that safetensors submissions can name.

Native CIFAR-sized networks live under short names (``resnet32``, ``preact_resnet18``,
``wrn28_10``, ``small_cnn``); torchvision's ImageNet classifiers under ``torchvision/<name>``
(for example ``torchvision/resnet50``), always built without pretrained weights.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from types import MappingProxyType

from torch import nn

import evaluator.models.architectures as architectures
from evaluator.errors import UnknownArchitectureError

__all__ = [
    "ARCHITECTURES",
    "TORCHVISION_PREFIX",
    "ArchitectureSpec",
    "get_architecture",
    "list_architectures",
]

TORCHVISION_PREFIX = "torchvision/"


@dataclass(frozen=True)
class ArchitectureSpec:
    """An architecture a submission can name.

    ``builder(num_classes)`` returns a freshly initialised module whose input is a normalised
    float32 batch ``(N, in_channels, *input_size)`` and whose output is ``(N, num_classes)``
    logits.
    """

    name: str
    builder: Callable[[int], nn.Module]
    input_size: tuple[int, int]
    in_channels: int
    description: str
    default_num_classes: int

    def build(self, num_classes: int | None = None) -> nn.Module:
        """The module for ``num_classes`` classes (the spec's default when None)."""
        n = self.default_num_classes if num_classes is None else num_classes
        if n < 1:
            raise ValueError(f"num_classes must be >= 1, got {n}")
        return self.builder(n)


def _native_specs() -> list[ArchitectureSpec]:
    return [
        ArchitectureSpec(
            name="resnet32",
            builder=architectures.resnet32,
            input_size=(32, 32),
            in_channels=3,
            description="CIFAR ResNet-32 of He et al. 2016 (3 stages x 5 basic blocks, "
            "16/32/64 channels, 1x1-conv+BN projection shortcuts), the paper's CIFAR model.",
            default_num_classes=10,
        ),
        ArchitectureSpec(
            name="preact_resnet18",
            builder=architectures.preact_resnet18,
            input_size=(32, 32),
            in_channels=3,
            description="PreAct ResNet-18 for 32x32 inputs (RobustBench key layout).",
            default_num_classes=10,
        ),
        ArchitectureSpec(
            name="wrn28_10",
            builder=architectures.wrn28_10,
            input_size=(32, 32),
            in_channels=3,
            description="WideResNet-28-10 for 32x32 inputs (RobustBench key layout).",
            default_num_classes=10,
        ),
        ArchitectureSpec(
            name="small_cnn",
            builder=architectures.small_cnn,
            input_size=(32, 32),
            in_channels=3,
            description="Small 3-layer CNN (~34k params) for the digits demo benchmark.",
            default_num_classes=10,
        ),
    ]


def _torchvision_specs() -> list[ArchitectureSpec]:
    import torchvision

    # ``module=torchvision.models`` keeps the image classifiers only (no detection,
    # segmentation, video or quantized models).
    names = torchvision.models.list_models(module=torchvision.models)
    return [
        ArchitectureSpec(
            name=f"{TORCHVISION_PREFIX}{name}",
            builder=partial(architectures.torchvision_model, name),
            # The imagenet benchmark feeds Resize(256) + CenterCrop(224) to every model.
            input_size=(224, 224),
            in_channels=3,
            description=f"torchvision.models.{name} (ImageNet classifier, built with "
            "weights=None; your safetensors file supplies the weights).",
            default_num_classes=1000,
        )
        for name in sorted(names)
    ]


ARCHITECTURES: Mapping[str, ArchitectureSpec] = MappingProxyType(
    {spec.name: spec for spec in _native_specs() + _torchvision_specs()}
)


def list_architectures() -> list[str]:
    """Registry names: native ones first, then ``torchvision/<name>`` in alphabetical order."""
    return list(ARCHITECTURES)


def get_architecture(name: str) -> ArchitectureSpec:
    """The spec registered under ``name``; ``UnknownArchitectureError`` lists the known names."""
    try:
        return ARCHITECTURES[name]
    except KeyError:
        pass
    known = list_architectures()
    hint = ""
    if f"{TORCHVISION_PREFIX}{name}" in ARCHITECTURES:
        candidates = [f"{TORCHVISION_PREFIX}{name}"]
    else:
        candidates = difflib.get_close_matches(name, known, n=3)
    if candidates:
        hint = f" Did you mean {' or '.join(repr(c) for c in candidates)}?"
    raise UnknownArchitectureError(
        f"Unknown architecture {name!r}.{hint} Known architectures: {', '.join(known)}. "
        "For any other architecture, upload a torch.export archive (.pt2) instead of "
        "safetensors weights."
    )
