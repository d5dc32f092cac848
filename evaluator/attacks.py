"""The attacks: exhaustive grid, random, worst-of-k, and the majority-vote defense under them.

The defense is attacked under a named attacker model (`VoteProtocol`): ``adaptive`` fixes the
defense's draws for an image and searches the grid against that one defended classifier,
``per-query`` draws afresh at every grid point, ``transfer`` attacks the undefended model and
lets the vote decide once at the point it chose.

All of them are one search: for each image, a list of candidate transformations (the grid
points, or k random draws), and the question "is the image classified correctly under every
candidate?". `evaluator.search` answers it; this module gives it the model (`Classifier`) and
the predictors of (image, candidate) pairs that each attack and defense asks it to search.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from evaluator.errors import EvaluationCancelled, ModelOutputError
from evaluator.search import PairPredictor
from evaluator.transforms import (
    FillMode,
    GridSpec,
    TransformBox,
    spatial_transform,
    uniform_transforms,
)
from evaluator.vocabulary import VOTE_ATTACKER_KEYS

__all__ = ["VoteProtocol", "Classifier", "majority_vote"]

# Streams keep the draws of different metrics independent of each other.
STREAM_WORST_OF_K = 1
STREAM_VOTE_NATURAL = 2
STREAM_VOTE_GRID = 3
STREAM_FIRST_ORDER = 4


class VoteProtocol(StrEnum):
    """What the attacker of the vote defense may do; every grid + vote number names one."""

    ADAPTIVE = "adaptive"
    PER_QUERY = "per-query"
    TRANSFER = "transfer"

    @property
    def metric_key(self) -> str:
        """The result key of grid + vote under this attacker (``grid_vote`` is the headline)."""
        return VOTE_ATTACKER_KEYS[self.value].value

    @property
    def description(self) -> str:
        return VOTE_PROTOCOL_DESCRIPTIONS[self]


VOTE_PROTOCOL_DESCRIPTIONS = {
    VoteProtocol.ADAPTIVE: (
        "the defense's draws for an image are fixed; the attacker searches all grid points "
        "against that defended classifier"
    ),
    VoteProtocol.PER_QUERY: (
        "the defense draws afresh at every grid point; the attacker wins if any one vote is wrong"
    ),
    VoteProtocol.TRANSFER: (
        "the attacker picks the undefended model's worst grid point; the vote decides there once"
    ),
}


class Classifier:
    """A model plus how to run it: device, precision, batch size; counts forward passes.

    ``predict`` takes images already on the device and returns ``(labels, probabilities)``.
    It checks the output once per call, so a model with the wrong number of classes or NaN
    logits fails with a message rather than a wrong number.
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        *,
        device: torch.device | str = "cpu",
        batch_size: int = 512,
        bf16: bool = False,
        channels_last: bool | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.num_classes = num_classes
        self.batch_size = batch_size
        self.bf16 = bf16
        # channels_last is faster for convolutions on GPUs and, with oneDNN, on CPUs too
        # (about 1.45x for the digits CNN on this project's 2-core CI machine).
        self.channels_last = True if channels_last is None else channels_last
        self.model = model.to(self.device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.forward_passes = 0

    @property
    def precision(self) -> str:
        return "bf16" if self.bf16 else "fp32"

    def logits(self, images: Tensor) -> Tensor:
        """Float32 logits ``(N, num_classes)`` for images on the device, in chunks of batch_size."""
        outs = []
        for start in range(0, images.shape[0], self.batch_size):
            outs.append(self._forward(images[start : start + self.batch_size]))
        if not outs:
            return torch.empty(0, self.num_classes, device=self.device)
        return torch.cat(outs)

    def _forward(self, batch: Tensor) -> Tensor:
        return self._run(batch, grad=False)

    def logits_with_grad(self, images: Tensor) -> Tensor:
        """Float32 logits that autograd can differentiate with respect to ``images``.

        One forward pass per image, counted. Runs outside inference mode with gradients on
        whatever the caller's mode; the model's parameters are never asked for gradients by
        this class (the model may live in another process and have none), and the model is
        used in the mode it was given in, eval.
        """
        return self._run(images, grad=True)

    def _run(self, batch: Tensor, *, grad: bool) -> Tensor:
        """One checked, counted forward pass; in inference mode unless ``grad``."""
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        with (
            torch.inference_mode(not grad),
            torch.set_grad_enabled(grad),
            torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16),
        ):
            out = self.model(batch)
        out = self._checked(out, batch)
        self.forward_passes += batch.shape[0]
        return out

    def _checked(self, out: object, batch: Tensor) -> Tensor:
        if isinstance(out, (tuple, list)):
            out = out[0]
        if not isinstance(out, Tensor) or out.shape != (batch.shape[0], self.num_classes):
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ModelOutputError(
                f"the model returned {shape} for a batch of {tuple(batch.shape)}; expected "
                f"logits of shape ({batch.shape[0]}, {self.num_classes}). Check the number of "
                "classes and that the model takes (N, C, H, W) images in [0, 1]."
            )
        out = out.float()
        if not bool(torch.isfinite(out.detach()).all()):
            raise ModelOutputError(
                "the model produced NaN or infinite logits; check the weights and the "
                "normalisation (mean/std), and that the model is in eval mode."
            )
        return out

    def predict(self, images: Tensor) -> tuple[Tensor, Tensor]:
        logits = self.logits(images)
        return logits.argmax(dim=1), logits.softmax(dim=1)


def majority_vote(labels: Tensor, probs: Tensor) -> Tensor:
    """The defended label from ``k`` votes per input: ``labels`` ``(N, k)``, ``probs``
    ``(N, k, classes)``. Most votes wins; a tie goes to the tied label with the highest summed
    softmax."""
    n, k, classes = probs.shape
    counts = torch.zeros(n, classes, device=labels.device, dtype=torch.float64)
    counts.scatter_add_(1, labels, torch.ones_like(labels, dtype=torch.float64))
    soft = probs.to(torch.float64).sum(dim=1)
    # Summed softmax is at most k, so it can only separate labels with equal counts.
    return (counts * (k + 1) + soft).argmax(dim=1)


def grid_pair_predictor(
    classifier: Classifier, images: Tensor, points: Tensor, fill: FillMode
) -> PairPredictor:
    """Predictions for (image, grid point) pairs: one resampling, one forward pass each."""
    points = points.to(images.device)

    def predict(rows: Tensor, cands: Tensor) -> Tensor:
        moved = spatial_transform(images[rows], points[cands], fill)
        return classifier.logits(moved).argmax(dim=1)

    return predict


def draw_pair_predictor(
    classifier: Classifier, images: Tensor, draws: Tensor, fill: FillMode
) -> PairPredictor:
    """Predictions for (image, draw) pairs, with ``draws`` ``(N, k, 3)`` per image."""

    def predict(rows: Tensor, cands: Tensor) -> Tensor:
        moved = spatial_transform(images[rows], draws[rows, cands], fill)
        return classifier.logits(moved).argmax(dim=1)

    return predict


def vote_predict(
    classifier: Classifier,
    inputs: Tensor,
    image_ids: Tensor,
    slots: Tensor | int,
    *,
    box: TransformBox,
    seed: int,
    stream: int,
    samples: int,
    fill: FillMode,
) -> Tensor:
    """The defended label of each input: majority of the model over ``samples`` transformations
    drawn from ``box``, keyed by ``(seed, stream, image id, slot)`` and applied to the input
    as it arrives (a second resampling when the input is already transformed)."""
    draws = uniform_transforms(box, seed, stream, image_ids, samples, slots).to(inputs.device)
    return vote_with_draws(classifier, inputs, draws, fill)


def vote_with_draws(
    classifier: Classifier, inputs: Tensor, draws: Tensor, fill: FillMode
) -> Tensor:
    """The defended label of each input given its draws ``(N, k, 3)``: the majority of the
    model over the ``k`` transformations applied to the input as it arrives."""
    n, samples = draws.shape[:2]
    expanded = (
        inputs.unsqueeze(1)
        .expand(n, samples, *inputs.shape[1:])
        .reshape(n * samples, *inputs.shape[1:])
    )
    labels, probs = classifier.predict(spatial_transform(expanded, draws.reshape(-1, 3), fill))
    return majority_vote(labels.view(n, samples), probs.view(n, samples, -1))


def fixed_vote_draws(box: TransformBox, image_ids: Tensor, *, seed: int, samples: int) -> Tensor:
    """The defense's draws ``(N, samples, 3)`` for each image, fixed by ``(seed, image id)``:
    the same as the vote's natural accuracy uses, so the adaptive and transfer attackers face
    the very classifier whose natural accuracy is reported."""
    return uniform_transforms(box, seed, STREAM_VOTE_NATURAL, image_ids, samples, 0)


def grid_vote_pair_predictor(
    classifier: Classifier,
    images: Tensor,
    image_ids: Tensor,
    grid: GridSpec,
    *,
    seed: int,
    samples: int,
    fill: FillMode,
) -> PairPredictor:
    """Defended predictions for (image, grid point) pairs: the attack's transformation, then a
    vote over fresh draws keyed by (seed, image id, grid index)."""
    points = grid.points().to(images.device)
    ids = image_ids.to(images.device)

    def predict(rows: Tensor, cands: Tensor) -> Tensor:
        attacked = spatial_transform(images[rows], points[cands], fill)
        return vote_predict(
            classifier,
            attacked,
            ids[rows],
            cands,
            box=grid.box,
            seed=seed,
            stream=STREAM_VOTE_GRID,
            samples=samples,
            fill=fill,
        )

    return predict


def fixed_vote_pair_predictor(
    classifier: Classifier,
    images: Tensor,
    draws: Tensor,
    points: Tensor,
    fill: FillMode,
) -> PairPredictor:
    """Defended predictions for (image, grid point) pairs under the ``adaptive`` attacker:
    the attack's transformation, then a vote over the image's fixed ``draws`` ``(N, k, 3)``,
    the same at every grid point."""
    points = points.to(images.device)
    draws = draws.to(images.device)

    def predict(rows: Tensor, cands: Tensor) -> Tensor:
        attacked = spatial_transform(images[rows], points[cands], fill)
        return vote_with_draws(classifier, attacked, draws[rows], fill)

    return predict


def undefended_worst_points(
    classifier: Classifier, images: Tensor, labels: Tensor, points: Tensor, fill: FillMode
) -> Tensor:
    """The ``transfer`` attacker's choice, per image: of all grid ``points``, a point the
    undefended model misclassifies if there is one, else the one of highest cross-entropy
    (among misclassified points, also the highest cross-entropy). Returns ``(N,)`` point
    indices; costs one forward pass per (image, point)."""
    n, p = images.shape[0], points.shape[0]
    points = points.to(images.device)
    loss = torch.empty(n * p, dtype=torch.float64, device=images.device)
    wrong = torch.empty(n * p, dtype=torch.bool, device=images.device)
    for start in range(0, n * p, classifier.batch_size):
        flat = torch.arange(start, min(start + classifier.batch_size, n * p), device=images.device)
        rows, cands = flat // p, flat % p
        logits = classifier.logits(spatial_transform(images[rows], points[cands], fill))
        # In float64: a confident model's float32 cross-entropy rounds to 0 at every point,
        # which would leave the choice to the order of the grid.
        loss[flat] = F.cross_entropy(logits.double(), labels[rows], reduction="none")
        wrong[flat] = logits.argmax(dim=1) != labels[rows]
    loss, wrong = loss.view(n, p), wrong.view(n, p)
    # Misclassified points first: where an image has any, the others drop out of the argmax.
    eligible = wrong | ~wrong.any(dim=1, keepdim=True)
    return torch.where(eligible, loss, -torch.inf).argmax(dim=1)


def check_cancel(should_stop: Callable[[], bool] | None) -> None:
    if should_stop is not None and should_stop():
        raise EvaluationCancelled("the evaluation was cancelled")
