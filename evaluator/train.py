"""Training baselines: standard, augmentation, and worst-of-k robust optimisation.

The three training methods of Engstrom et al. (ICML 2019, Section 5), over the same threat
model as the evaluation (`evaluator.transforms`):

- **standard**: the images as they are.
- **augmentation**: every example, at every step, under one transformation drawn uniformly
  from the box.
- **worst-of-k**: every example, at every step, under ``k`` transformations drawn uniformly
  from the box; the one with the highest loss (searched with batch norm in eval mode) is
  the only one the step trains on.

The model takes images in ``[0, 1]`` (wrap it with `evaluator.models.Normalized` to normalise
inside); transformations are applied before it, as in the evaluation. Random draws come from
``torch.Generator`` objects seeded by ``seed`` (one for the data order, one for the
transformations), never from the global generator, so a run is a function of its arguments:
on the CPU the same seed gives the same weights bit for bit. Nothing here prints or writes
files; `train` reports progress through a callback and returns a `TrainResult`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from evaluator.models.registry import get_architecture
from evaluator.transforms import FillMode, TransformBox, spatial_transform
from evaluator.vocabulary import TrainingMethod

__all__ = [
    "TRAINABLE_METHODS",
    "TrainingMethod",
    "trainable_method",
    "Schedule",
    "EpochStats",
    "TrainResult",
    "ProgressCallback",
    "build_model",
    "uniform_draws",
    "augment_batch",
    "worst_of_k_batch",
    "train_step",
    "train",
    "accuracy",
    "resolve_device",
]


TRAINABLE_METHODS = (
    TrainingMethod.STANDARD,
    TrainingMethod.AUGMENTATION,
    TrainingMethod.WORST_OF_K,
)


def trainable_method(method: TrainingMethod | str) -> TrainingMethod:
    """``method`` as a member this module can train with; ``ValueError`` for ``other`` or an
    unknown name."""
    method = TrainingMethod(method)
    if method not in TRAINABLE_METHODS:
        choices = ", ".join(TRAINABLE_METHODS)
        raise ValueError(f"cannot train with method {method.value!r}; choose one of {choices}")
    return method


class Schedule(StrEnum):
    """Learning-rate schedule, stepped once per optimiser step.

    ``cosine`` anneals from ``lr`` to 0; ``step`` divides by 10 at 50% and 75% of training.
    """

    COSINE = "cosine"
    STEP = "step"


ProgressCallback = Callable[[int, int, int, float, float], None]
"""``progress(epoch, step, total_steps, loss, acc)`` after every step: ``epoch`` from 1,
``step`` counted from 1 over the whole run, ``loss`` and ``acc`` the running means over the
epoch so far (on the images trained on, i.e. the transformed ones)."""


@dataclass(frozen=True)
class EpochStats:
    epoch: int
    loss: float
    accuracy: float
    lr: float  # at the epoch's last step


@dataclass
class TrainResult:
    """What a training run did. ``train_accuracy`` is the last epoch's running accuracy on the
    images it trained on (transformed, for augmentation and worst-of-k); ``natural_accuracy``
    is the trained model's accuracy on the untransformed training images, in eval mode."""

    method: TrainingMethod
    epochs: int
    steps: int
    history: list[EpochStats] = field(default_factory=list)
    natural_accuracy: float = float("nan")
    seconds: float = 0.0

    @property
    def train_accuracy(self) -> float:
        return self.history[-1].accuracy if self.history else float("nan")

    @property
    def train_loss(self) -> float:
        return self.history[-1].loss if self.history else float("nan")


def build_model(arch: str, num_classes: int | None = None, seed: int = 0) -> nn.Module:
    """A freshly initialised registry architecture whose initial weights depend on ``seed``
    only. The global generator is used (architectures initialise through it) but restored
    afterwards, so the caller's random state is untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_architecture(arch).build(num_classes)


def uniform_draws(box: TransformBox, n: int, k: int, generator: torch.Generator) -> Tensor:
    """``(n, k, 3)`` float32 transformations ``(theta, dx, dy)`` drawn uniformly from ``box``
    with ``generator`` (a CPU generator; the draws are on the CPU)."""
    unit = torch.rand(n, k, 3, generator=generator, dtype=torch.float64)
    return box.scale(unit)


def augment_batch(
    images: Tensor,
    box: TransformBox,
    generator: torch.Generator,
    fill: FillMode | str = FillMode.ZEROS,
) -> Tensor:
    """Each image of ``(N, C, H, W)`` under one transformation drawn uniformly from ``box``."""
    params = uniform_draws(box, images.shape[0], 1, generator)[:, 0].to(images.device)
    return spatial_transform(images, params, fill)


class _EvalMode:
    """Puts a model in eval mode and restores every submodule's own mode on exit."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.modes: list[tuple[nn.Module, bool]] = []

    def __enter__(self) -> None:
        self.modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()

    def __exit__(self, *exc: object) -> None:
        for module, mode in self.modes:
            module.training = mode


@torch.no_grad()
def _candidate_losses(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    params: Tensor,
    fill: FillMode | str,
) -> Tensor:
    """``(N, k)`` per-example cross-entropy of ``model`` under each of ``params`` ``(N, k, 3)``."""
    # k passes over N rather than one over N * k: on a small CPU the smaller batches stay in
    # cache and measured faster, and memory stays that of one training batch.
    losses = []
    for j in range(params.shape[1]):
        moved = spatial_transform(images, params[:, j], fill)
        losses.append(F.cross_entropy(model(moved), labels, reduction="none"))
    return torch.stack(losses, dim=1)


def worst_of_k_batch(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    box: TransformBox,
    k: int,
    generator: torch.Generator,
    fill: FillMode | str = FillMode.ZEROS,
) -> Tensor:
    """The worst of ``k`` uniform transformations of each image, for training on.

    For each image of ``(N, C, H, W)``, draws ``k`` transformations uniformly from ``box``,
    computes the model's cross-entropy under each (without gradients, with the model in eval
    mode so that batch norm uses and keeps its running statistics; every submodule's mode is
    restored afterwards) and returns the ``(N, C, H, W)`` batch of the highest-loss ones.
    Ties go to the earliest draw.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    params = uniform_draws(box, images.shape[0], k, generator).to(images.device)
    with _EvalMode(model):
        losses = _candidate_losses(model, images, labels, params, fill)
    worst = losses.argmax(dim=1)
    chosen = params[torch.arange(images.shape[0], device=images.device), worst]
    return spatial_transform(images, chosen, fill)


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: Tensor,
    labels: Tensor,
    *,
    method: TrainingMethod | str,
    box: TransformBox,
    generator: torch.Generator,
    k: int = 10,
    fill: FillMode | str = FillMode.ZEROS,
) -> tuple[float, int]:
    """One optimiser step on a batch (already on the model's device) with ``method``.

    Leaves the model in train mode. Returns the batch's mean loss and the number of the
    trained-on images classified correctly (both measured in the training forward pass).
    """
    method = trainable_method(method)
    if method is TrainingMethod.AUGMENTATION:
        inputs = augment_batch(images, box, generator, fill)
    elif method is TrainingMethod.WORST_OF_K:
        inputs = worst_of_k_batch(model, images, labels, box, k, generator, fill)
    else:
        inputs = images
    model.train()
    logits = model(inputs)
    loss = F.cross_entropy(logits, labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    correct = int((logits.detach().argmax(dim=1) == labels).sum())
    return float(loss.detach()), correct


def _batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    """A shuffled pass over ``range(n)``; a last batch of one is dropped (batch norm cannot
    train on it)."""
    order = torch.randperm(n, generator=generator)
    for start in range(0, n, batch_size):
        batch = order[start : start + batch_size]
        if batch.numel() > 1 or n == 1:
            yield batch


def _steps_per_epoch(n: int, batch_size: int) -> int:
    full, rest = divmod(n, batch_size)
    return full + (1 if rest > 1 or (rest == 1 and n == 1) else 0)


def _lr_factor(schedule: Schedule, step: int, total: int) -> float:
    """Multiplier of the base learning rate for optimiser step ``step`` (from 0)."""
    progress = step / max(total, 1)
    if schedule is Schedule.COSINE:
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 0.01 if progress >= 0.75 else 0.1 if progress >= 0.5 else 1.0


@torch.no_grad()
def accuracy(model: nn.Module, images: Tensor, labels: Tensor, *, batch_size: int = 512) -> float:
    """Accuracy of ``model`` in eval mode on untransformed ``images`` (moved batch by batch to
    the model's device). The model's modes are restored afterwards."""
    if labels.numel() == 0:
        return float("nan")
    device = next(model.parameters()).device
    correct = 0
    with _EvalMode(model):
        for start in range(0, labels.numel(), batch_size):
            batch = images[start : start + batch_size].to(device)
            preds = model(batch).argmax(dim=1).cpu()
            correct += int((preds == labels[start : start + batch_size].cpu()).sum())
    return correct / labels.numel()


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` means CUDA when available, else the CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def train(
    model: nn.Module,
    dataset_images: Tensor,
    labels: Tensor,
    *,
    method: TrainingMethod | str,
    box: TransformBox,
    k: int = 10,
    epochs: int,
    batch_size: int = 128,
    lr: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    schedule: Schedule | str = Schedule.COSINE,
    seed: int = 0,
    device: str | torch.device = "cpu",
    fill: FillMode | str = FillMode.ZEROS,
    progress: ProgressCallback | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``dataset_images`` ``(N, C, H, W)`` in ``[0, 1]`` and int64
    ``labels`` ``(N,)`` with ``method``; returns a `TrainResult` with the model (on ``device``)
    left in eval mode.

    SGD with momentum and weight decay, the learning rate following ``schedule`` per step.
    The data order comes from a generator seeded with ``seed`` and the transformations from
    another seeded with ``seed + 1``, so the methods see the same batches for one seed. The
    images stay where they are and move to ``device`` batch by batch.
    """
    method = trainable_method(method)
    schedule = Schedule(schedule)
    if dataset_images.ndim != 4 or labels.shape != (dataset_images.shape[0],):
        raise ValueError(
            f"images must be (N, C, H, W) and labels (N,); got {tuple(dataset_images.shape)} "
            f"and {tuple(labels.shape)}"
        )
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    if method is TrainingMethod.WORST_OF_K and k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    device = resolve_device(device)
    model.to(device)
    n = labels.shape[0]
    order_gen = torch.Generator().manual_seed(seed)
    draw_gen = torch.Generator().manual_seed(seed + 1)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay
    )
    steps_per_epoch = _steps_per_epoch(n, batch_size)
    total = steps_per_epoch * epochs
    result = TrainResult(method=method, epochs=epochs, steps=total)
    start_time = time.perf_counter()
    step = 0
    for epoch in range(1, epochs + 1):
        loss_sum, correct, seen = 0.0, 0, 0
        for batch in _batches(n, batch_size, order_gen):
            current_lr = lr * _lr_factor(schedule, step, total)
            for group in optimizer.param_groups:
                group["lr"] = current_lr
            images = dataset_images[batch].to(device, torch.float32)
            targets = labels[batch].to(device)
            loss, ok = train_step(
                model,
                optimizer,
                images,
                targets,
                method=method,
                box=box,
                generator=draw_gen,
                k=k,
                fill=fill,
            )
            step += 1
            loss_sum += loss * batch.numel()
            correct += ok
            seen += batch.numel()
            if progress is not None:
                progress(epoch, step, total, loss_sum / seen, correct / seen)
        result.history.append(EpochStats(epoch, loss_sum / seen, correct / seen, current_lr))
    model.eval()
    result.natural_accuracy = accuracy(model, dataset_images, labels)
    result.seconds = time.perf_counter() - start_time
    return result
