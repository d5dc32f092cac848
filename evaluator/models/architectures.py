"""Classifier architectures that safetensors submissions can name.

Every builder takes ``num_classes`` and returns a freshly initialised ``nn.Module`` that maps a
float32 batch ``(N, C, H, W)`` of *normalised* images to logits ``(N, num_classes)``. Input
normalisation (mean/std) is not part of these modules; ``loading.Normalized`` adds it.

Parameter names follow the implementations people train with, so that their state dicts load
without renaming:

- ``resnet32``: the CIFAR ResNet of He et al. 2016 (Section 4.2), in the key layout of the
  widely used akamaster/pytorch_resnet_cifar10 (``conv1``, ``bn1``, ``layer1..3``, ``linear``).
- ``preact_resnet18`` and ``wrn28_10``: the key layouts of RobustBench's CIFAR-10 models
  (Rice et al. 2020 PreAct ResNet-18; Zagoruyko and Komodakis 2016 WideResNet as in Madry et al.
  and Engstrom et al.).
- ``small_cnn``: this project's demo network for the ``digits`` benchmark.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "CifarResNet",
    "PreActResNet",
    "SmallCNN",
    "WideResNet",
    "preact_resnet18",
    "resnet32",
    "small_cnn",
    "torchvision_model",
    "wrn28_10",
    "wrn_28_k",
]


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)


def _init_weights(model: nn.Module) -> None:
    """He initialisation for convolutions, unit/zero batch norm, zero linear bias."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)


# --- ResNet-32 (He et al. 2016, CIFAR variant) ------------------------------------------------


class _BasicBlock(nn.Module):
    """Post-activation basic block: conv-BN-ReLU-conv-BN, plus shortcut, then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        # Option B of He et al.: a projection (1x1 conv + BN) only where the shape changes.
        # Option A (zero-padded identity) has no parameters and is also common; we pick B
        # because it is the one torchvision and most re-implementations use, and a state dict
        # saved from an option-A model then fails loudly (missing ``shortcut.*`` keys) rather
        # than loading into a subtly different network.
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """He et al.'s CIFAR ResNet of depth ``6n + 2``: three stages of ``n`` basic blocks with
    16, 32 and 64 channels (stride 1, 2, 2), global average pooling and a linear layer.

    Expects 3x32x32 inputs (works on any size, since pooling is global).
    """

    def __init__(self, depth: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2 with n >= 1, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = _conv3x3(3, 16)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._stage(16, 16, n, stride=1)
        self.layer2 = self._stage(16, 32, n, stride=2)
        self.layer3 = self._stage(32, 64, n, stride=2)
        self.linear = nn.Linear(64, num_classes)
        _init_weights(self)

    @staticmethod
    def _stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [_BasicBlock(in_planes, planes, stride)]
        layers += [_BasicBlock(planes, planes) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        return self.linear(out)


def resnet32(num_classes: int = 10) -> CifarResNet:
    """The paper's CIFAR-10 ResNet-32 (5 blocks per stage, option-B shortcuts, ~0.47M params)."""
    return CifarResNet(depth=32, num_classes=num_classes)


# --- PreAct ResNet-18 (He et al. 2016b, CIFAR-sized stem) ----------------------------------------


class _PreActBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        # A projection shortcut sees the pre-activated input; an identity one the raw input.
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    """Pre-activation ResNet for 32x32 inputs: 3x3 stem without pooling, four stages of 64, 128,
    256, 512 channels, a final BN-ReLU (as in the paper) and global average pooling."""

    def __init__(self, blocks: tuple[int, ...] = (2, 2, 2, 2), num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = _conv3x3(3, 64)
        widths = (64, 128, 256, 512)
        in_planes = 64
        stages = []
        for i, (width, count) in enumerate(zip(widths, blocks, strict=True)):
            stride = 1 if i == 0 else 2
            layers = [_PreActBlock(in_planes, width, stride)]
            layers += [_PreActBlock(width, width) for _ in range(count - 1)]
            stages.append(nn.Sequential(*layers))
            in_planes = width
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.bn = nn.BatchNorm2d(512)
        self.linear = nn.Linear(512, num_classes)
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.relu(self.bn(out))
        out = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        return self.linear(out)


def preact_resnet18(num_classes: int = 10) -> PreActResNet:
    """PreAct ResNet-18 for 32x32 inputs (~11.2M params)."""
    return PreActResNet((2, 2, 2, 2), num_classes=num_classes)


# --- WideResNet (Zagoruyko and Komodakis 2016) --------------------------------------------------


class _WideBlock(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = _conv3x3(in_planes, out_planes, stride)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = _conv3x3(out_planes, out_planes)
        self.drop_rate = drop_rate
        # ``convShortcut`` keeps the parameter name of the reference implementation.
        self.convShortcut: nn.Conv2d | None = None
        if in_planes != out_planes or stride != 1:
            self.convShortcut = nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        act = F.relu(self.bn1(x))
        out = F.relu(self.bn2(self.conv1(act)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        shortcut = x if self.convShortcut is None else self.convShortcut(act)
        return shortcut + out


class _NetworkBlock(nn.Module):
    def __init__(
        self, blocks: int, in_planes: int, out_planes: int, stride: int, drop_rate: float
    ) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *[
                _WideBlock(
                    in_planes if i == 0 else out_planes,
                    out_planes,
                    stride if i == 0 else 1,
                    drop_rate,
                )
                for i in range(blocks)
            ]
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-``depth``-``widen_factor``: three stages of ``(depth - 4) / 6`` pre-activation blocks
    with ``16k``, ``32k``, ``64k`` channels, for 32x32 inputs."""

    def __init__(
        self,
        depth: int = 28,
        widen_factor: int = 10,
        num_classes: int = 10,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"WideResNet depth must be 6n + 4 with n >= 1, got {depth}")
        if widen_factor < 1:
            raise ValueError(f"widen_factor must be >= 1, got {widen_factor}")
        n = (depth - 4) // 6
        widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.conv1 = _conv3x3(3, widths[0])
        self.block1 = _NetworkBlock(n, widths[0], widths[1], 1, drop_rate)
        self.block2 = _NetworkBlock(n, widths[1], widths[2], 2, drop_rate)
        self.block3 = _NetworkBlock(n, widths[2], widths[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.relu(self.bn1(out))
        out = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        return self.fc(out)


def wrn_28_k(num_classes: int = 10, widen_factor: int = 10) -> WideResNet:
    """WideResNet-28 with a chosen widen factor (``wrn_28_k(widen_factor=1)`` is tiny)."""
    return WideResNet(depth=28, widen_factor=widen_factor, num_classes=num_classes)


def wrn28_10(num_classes: int = 10) -> WideResNet:
    """WideResNet-28-10 (36.5M params for 10 classes)."""
    return wrn_28_k(num_classes=num_classes, widen_factor=10)


# --- Demo CNN ---------------------------------------------------------------------------------


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU-maxpool stages (16, 32, 64 channels) and a linear layer on the
    flattened 4x4 map; ~34k parameters for 3x32x32 inputs and 10 classes.

    The head flattens rather than pools globally, so it keeps where features are: for the
    ``digits`` demo that trains in a few CPU-seconds (and, usefully for a spatial-robustness
    demo, is not translation invariant by construction).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        widths = (in_channels, 16, 32, 64)
        for c_in, c_out in zip(widths[:-1], widths[1:], strict=True):
            layers += [
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(64 * 4 * 4, num_classes)
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        out = self.features(x)
        if out.shape[-2:] != (4, 4):
            # Lets other input sizes through with the same head. Skipped at 32x32, where it is
            # the identity, because its backward pass is several times slower than the rest.
            out = F.adaptive_avg_pool2d(out, 4)
        return self.classifier(torch.flatten(out, 1))


def small_cnn(num_classes: int = 10) -> SmallCNN:
    """The ``digits`` demo network (3x32x32 input)."""
    return SmallCNN(num_classes=num_classes)


# --- torchvision ------------------------------------------------------------------------------


def torchvision_model(name: str, num_classes: int = 1000) -> nn.Module:
    """torchvision classification model ``name``, randomly initialised.

    Built with ``weights=None``: this never downloads anything. Submissions bring their own
    weights as safetensors. GoogLeNet and Inception-v3 are built without their auxiliary
    training heads, as torchvision's pretrained models are, so their state dicts are the
    ones ``model.state_dict()`` gives for those (the heads play no part in evaluation).
    """
    import torchvision

    kwargs: dict[str, bool] = {}
    if name in _AUX_HEAD_MODELS:
        # init_weights=False also skips a slow scipy initialisation and its FutureWarning;
        # the weights are replaced by the submission's anyway.
        kwargs = {"aux_logits": False, "init_weights": False}
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)


_AUX_HEAD_MODELS = frozenset({"googlenet", "inception_v3"})
