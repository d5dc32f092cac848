"""The first-order attack: projected gradient ascent over (theta, dx, dy).

Engstrom et al. (ICML 2019) report that gradient attacks on the transformation parameters find
the worst case less reliably than the exhaustive grid, because the loss is far from concave in
them. This module measures that claim on any model the evaluator can differentiate: a
registry module, an exported program, or a model answering in another process whose backward
pass is a vector-Jacobian request. Input gradients come from plain autograd on
``classifier.model`` through `evaluator.transforms.differentiable_transform`; the model's own
parameters are never asked for gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from evaluator.attacks import STREAM_FIRST_ORDER, Classifier
from evaluator.errors import ModelNotDifferentiableError
from evaluator.transforms import (
    FillMode,
    TransformBox,
    differentiable_transform,
    spatial_transform,
    uniform_transforms,
)

__all__ = ["FirstOrderConfig", "FirstOrderOutcome", "first_order_attack"]


@dataclass(frozen=True)
class FirstOrderConfig:
    """The attack's settings; the defaults are what the benchmarks run.

    - ``steps = 20`` steps of signed gradient ascent on the cross-entropy of the true label,
      each followed by projection onto the box (clipping each parameter to its limits);
    - step sizes ``theta_step`` (degrees) and ``translation_step`` (pixels, both axes): None
      means a tenth of the box's limit, so 20 steps can cross the box from edge to edge
      (3 degrees and 0.3 pixels on the +-30 degree, +-3 pixel box of CIFAR-10);
    - ``restarts = 3`` starts per image: the identity, then uniform draws from the box keyed
      by (seed, image id, restart), so the attack is reproducible.

    An image counts as robust only if the model is right at the identity and at the worst
    point the attack visited (misclassified first, then highest cross-entropy).
    """

    steps: int = 20
    restarts: int = 3
    theta_step: float | None = None
    translation_step: float | None = None

    def step_sizes(self, box: TransformBox) -> Tensor:
        """``(3,)`` float64: the step per parameter, in degrees and pixels."""
        theta = box.max_rotation / 10 if self.theta_step is None else self.theta_step
        if self.translation_step is None:
            dx, dy = box.max_dx / 10, box.max_dy / 10
        else:
            dx = dy = self.translation_step
        return torch.tensor([theta, dx, dy], dtype=torch.float64)

    def record(self, box: TransformBox) -> dict[str, object]:
        """The settings as run, with the step sizes resolved for ``box``."""
        theta, dx, dy = self.step_sizes(box).tolist()
        return {
            **asdict(self),
            "theta_step": theta,
            "translation_step": [dx, dy],
            "loss": "cross-entropy",
            "update": "sign of the gradient, then clip to the box",
            "starts": "the identity, then uniform draws keyed by (seed, image id, restart)",
        }


@dataclass
class FirstOrderOutcome:
    """Per image: ``correct`` at the worst point the attack found, that ``point`` ``(N, 3)``
    (theta, dx, dy) and the cross-entropy ``loss`` there."""

    correct: Tensor
    point: Tensor
    loss: Tensor


def first_order_attack(
    classifier: Classifier,
    images: Tensor,
    labels: Tensor,
    image_ids: Tensor,
    box: TransformBox,
    *,
    seed: int,
    fill: FillMode = FillMode.ZEROS,
    config: FirstOrderConfig = FirstOrderConfig(),
    on_batch: Callable[[int], None] | None = None,
) -> FirstOrderOutcome:
    """Attack each of ``images`` ``(N, C, H, W)`` (on the classifier's device, in [0, 1]) with
    ``config.restarts`` runs of projected gradient ascent inside ``box``.

    Costs ``restarts * (steps + 1) + 1`` forward passes and ``restarts * steps`` backward
    passes per image. Raises `ModelNotDifferentiableError` when the logits do not depend
    differentiably on the input. ``on_batch(images_done)`` is called after each batch.
    """
    n = images.shape[0]
    device = images.device
    limits = box.limits().to(device, torch.float32)
    steps = config.step_sizes(box).to(device, torch.float32)
    # Inference tensors (made under inference_mode) cannot enter an autograd graph.
    images = images.detach().clone()
    worst_point = torch.zeros(n, 3, device=device)
    worst_loss = torch.full((n,), -torch.inf, dtype=torch.float64, device=device)
    worst_wrong = torch.zeros(n, dtype=torch.bool, device=device)
    per_batch = max(1, classifier.batch_size // config.restarts)
    for start in range(0, n, per_batch):
        rows = torch.arange(start, min(start + per_batch, n), device=device)
        starts = _starts(box, seed, image_ids[rows.cpu()].to(device), config.restarts)
        point, loss, wrong = _ascend(
            classifier, images[rows], labels[rows], starts, limits, steps, config.steps, fill
        )
        worst_point[rows], worst_loss[rows], worst_wrong[rows] = point, loss, wrong
        if on_batch is not None:
            on_batch(int(rows[-1]) + 1)
    # The verdict is the grid's own resampling at the point found, so a first-order number
    # and a grid number mean the same thing by "fooled at this point".
    predictions = classifier.logits(spatial_transform(images, worst_point, fill)).argmax(dim=1)
    return FirstOrderOutcome(predictions == labels, worst_point, worst_loss)


def _starts(box: TransformBox, seed: int, image_ids: Tensor, restarts: int) -> Tensor:
    """``(N, restarts, 3)``: the identity, then uniform draws from the box."""
    n = image_ids.shape[0]
    identity = torch.zeros(n, 1, 3, device=image_ids.device)
    if restarts == 1:
        return identity
    draws = uniform_transforms(box, seed, STREAM_FIRST_ORDER, image_ids, restarts - 1)
    return torch.cat([identity, draws.to(image_ids.device)], dim=1)


def _ascend(
    classifier: Classifier,
    images: Tensor,
    labels: Tensor,
    starts: Tensor,
    limits: Tensor,
    step_sizes: Tensor,
    n_steps: int,
    fill: FillMode,
) -> tuple[Tensor, Tensor, Tensor]:
    """Run every start of every image together; return per image the worst point visited
    (misclassified first, then highest cross-entropy), its loss and whether it fools."""
    n, restarts = starts.shape[:2]
    flat_images = images.repeat_interleave(restarts, dim=0)
    flat_labels = labels.repeat_interleave(restarts, dim=0)
    params = starts.reshape(n * restarts, 3).clone()
    best_point = params.clone()
    best_loss = torch.full((n * restarts,), -torch.inf, dtype=torch.float64, device=images.device)
    best_wrong = torch.zeros(n * restarts, dtype=torch.bool, device=images.device)
    for step in range(n_steps + 1):
        params.requires_grad_(True)
        with torch.inference_mode(False), torch.enable_grad():
            logits = classifier.logits_with_grad(
                differentiable_transform(flat_images, params, fill)
            )
            # In float64, so that a confident model's loss does not round to 0 everywhere and
            # leave nothing to rank the points visited by.
            loss = F.cross_entropy(logits.double(), flat_labels, reduction="none")
        wrong = logits.detach().argmax(dim=1) != flat_labels
        better = _is_worse(wrong, loss.detach(), best_wrong, best_loss)
        best_point[better] = params.detach()[better]
        best_loss[better] = loss.detach()[better]
        best_wrong |= wrong
        if step == n_steps:
            break
        grad = _input_gradient(loss.sum(), params)
        with torch.no_grad():
            moved = params.detach() + step_sizes * grad.sign()
            params = torch.maximum(torch.minimum(moved, limits), -limits)
    # Pick the worst restart of each image.
    best_loss, best_wrong = best_loss.view(n, restarts), best_wrong.view(n, restarts)
    eligible = best_wrong | ~best_wrong.any(dim=1, keepdim=True)
    pick = torch.where(eligible, best_loss, -torch.inf).argmax(dim=1)
    chosen = torch.arange(n, device=images.device) * restarts + pick
    return best_point[chosen], best_loss.flatten()[chosen], best_wrong.flatten()[chosen]


def _is_worse(wrong: Tensor, loss: Tensor, best_wrong: Tensor, best_loss: Tensor) -> Tensor:
    """Where the new point beats the best so far: fooling beats not fooling, then higher
    loss."""
    return (wrong & ~best_wrong) | ((wrong == best_wrong) & (loss > best_loss))


def _input_gradient(loss: Tensor, params: Tensor) -> Tensor:
    """d loss / d params, or `ModelNotDifferentiableError` saying why there is none."""
    if not loss.requires_grad:
        raise ModelNotDifferentiableError(
            "the model's logits do not depend differentiably on its input (no gradient "
            "reaches them), so the first-order attack cannot run"
        )
    try:
        (grad,) = torch.autograd.grad(loss, params)
    except RuntimeError as exc:
        raise ModelNotDifferentiableError(
            f"the model could not be differentiated with respect to its input: {exc}"
        ) from exc
    if not bool(torch.isfinite(grad).all()):
        raise ModelNotDifferentiableError(
            "the model's input gradient is NaN or infinite, so the first-order attack cannot run"
        )
    return grad
