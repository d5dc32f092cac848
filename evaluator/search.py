"""The one search every attack is: try candidate transformations on images until each image is
fooled once or has survived them all.

A candidate is an index (a grid point, or one of an image's k random draws); a
`PairPredictor` answers the label of (image, candidate) pairs, so this module knows nothing of
models, transforms or defenses (those predictors are in `evaluator.attacks`).
`search_candidates` works in large batches of pairs taken from the images still standing,
stops trying an image once one candidate fools it (early exit), and tries first the candidates
that have fooled the most images so far (`CandidateOrder`). Neither early exit nor the order
can change which images survive; they only change how many forward passes it takes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["CandidateOrder", "PairPredictor", "SearchOutcome", "search_candidates"]


class CandidateOrder:
    """Which candidates to try first: most images fooled so far, ties by a prior order."""

    def __init__(self, prior: Tensor) -> None:
        n = prior.numel()
        self._prior_rank = torch.empty(n, dtype=torch.float64)
        self._prior_rank[prior] = torch.arange(n, dtype=torch.float64)
        self.fooled = torch.zeros(n, dtype=torch.float64)
        # Bumped on every update, so a search recomputes the ranking only when it changed.
        self.version = 0

    def ranking(self) -> Tensor:
        # Counts are integers, prior ranks lie in [0, n): scaling by n keeps counts dominant.
        key = -self.fooled * len(self.fooled) + self._prior_rank
        return torch.argsort(key)

    def update(self, fooling_candidates: Tensor) -> None:
        self.fooled += torch.bincount(fooling_candidates.cpu(), minlength=len(self.fooled)).double()
        self.version += 1


@dataclass
class SearchOutcome:
    """Per image: ``first_fool`` = the candidate that fooled it first (-1 if none did) and the
    prediction there; ``correct`` = ``(N, n_candidates)`` correctness, filled where tried
    (exhaustive images are tried everywhere); ``tried`` marks what was tried."""

    first_fool: Tensor
    fool_prediction: Tensor
    correct: Tensor
    tried: Tensor
    pairs: int

    @property
    def robust(self) -> Tensor:
        return (self.first_fool < 0) & self.tried.all(dim=1)


PairPredictor = Callable[[Tensor, Tensor], Tensor]
"""(image rows, candidate indices) -> predicted labels, one per pair."""


def search_candidates(
    predict_pairs: PairPredictor,
    labels: Tensor,
    n_candidates: int,
    *,
    pairs_per_batch: int,
    order: CandidateOrder | None = None,
    exhaustive: Tensor | None = None,
    known: tuple[int, Tensor, Tensor] | None = None,
    on_batch: Callable[[int, int], None] | None = None,
) -> SearchOutcome:
    """Try candidates on images until each image is fooled once or has survived all of them.

    ``labels`` ``(N,)`` on the device. ``exhaustive`` ``(N,)`` bool marks images to try at
    every candidate regardless of early exit (for the landscape). ``known`` =
    ``(candidate, correct, predictions)`` supplies results already computed for one candidate
    (the identity, from the natural pass). ``on_batch(images_done, pairs)`` is called after
    every batch; it may raise to stop.

    Each round takes a window of at most ``pairs_per_batch`` standing images and gives each an
    equal share of the batch, in the current order of the candidates, so batches stay full
    while few images are left; an image that may stop early takes at most as many candidates
    as it has tried so far (`_round_quota`), so few passes go past its first fooling point.
    The ranking is recomputed only when the order has changed.
    """
    device = labels.device
    n = labels.shape[0]
    tried = torch.zeros(n, n_candidates, dtype=torch.bool, device=device)
    # Kept alongside `tried` so that finding the standing images each round costs O(N), not
    # O(N x candidates): with 20,000 images and 775 grid points that is most of a round.
    tried_count = torch.zeros(n, dtype=torch.long, device=device)
    correct = torch.ones(n, n_candidates, dtype=torch.bool, device=device)
    first_fool = torch.full((n,), -1, dtype=torch.long, device=device)
    fool_pred = torch.full((n,), -1, dtype=torch.long, device=device)
    exhaustive = (
        torch.zeros(n, dtype=torch.bool, device=device)
        if exhaustive is None
        else exhaustive.to(device)
    )
    if known is not None:
        cand, known_correct, known_pred = known
        tried[:, cand] = True
        tried_count += 1
        correct[:, cand] = known_correct
        wrong = ~known_correct
        first_fool[wrong] = cand
        fool_pred[wrong] = known_pred[wrong]
        if order is not None:
            order.update(torch.full((int(wrong.sum()),), cand, dtype=torch.long))
    pairs = 0
    arange_cache = torch.arange(n_candidates, device=device)
    # What each image had tried before the search began (the known candidate): its own tries
    # count from there.
    tried_before = tried_count.clone()
    ranking: Tensor | None = None
    ranking_version = -1
    while True:
        standing = ((first_fool < 0) | exhaustive) & (tried_count < n_candidates)
        active = standing.nonzero().squeeze(1)
        if active.numel() == 0:
            break
        active = active[:pairs_per_batch]
        if ranking is None or (order is not None and order.version != ranking_version):
            ranking = (order.ranking() if order is not None else arange_cache.cpu()).to(device)
            ranking_version = order.version if order is not None else 0
        untried = ~tried[active][:, ranking]
        quota = _round_quota(
            pairs_per_batch, tried_count[active] - tried_before[active], exhaustive[active]
        )
        take = untried & (untried.cumsum(dim=1) <= quota[:, None])
        rows, cols = take.nonzero(as_tuple=True)
        images = active[rows]
        cands = ranking[cols]
        preds = predict_pairs(images, cands)
        ok = preds == labels[images]
        tried[images, cands] = True
        tried_count.index_add_(0, images, torch.ones_like(images))
        correct[images, cands] = ok
        pairs += images.numel()
        wrong = ~ok
        if order is not None and bool(wrong.any()):
            order.update(cands[wrong])
        # The first wrong pair of each image in this batch, in ranking order (rows are sorted
        # and, within a row, columns ascend), becomes its first fooling candidate.
        wrong_images = images[wrong]
        if wrong_images.numel():
            first_in_batch = torch.ones_like(wrong_images, dtype=torch.bool)
            first_in_batch[1:] = wrong_images[1:] != wrong_images[:-1]
            newly = wrong_images[first_in_batch]
            fresh = first_fool[newly] < 0
            first_fool[newly[fresh]] = cands[wrong][first_in_batch][fresh]
            fool_pred[newly[fresh]] = preds[wrong][first_in_batch][fresh]
        if on_batch is not None:
            still = ((first_fool < 0) | exhaustive) & (tried_count < n_candidates)
            done = n - int(still.sum())
            on_batch(done, images.numel())
    return SearchOutcome(first_fool, fool_pred, correct, tried, pairs)


def _round_quota(pairs_per_batch: int, searched: Tensor, exhaustive: Tensor) -> Tensor:
    """How many candidates each image of a round's window may try.

    An equal share of the batch, but an image that may still stop early tries at most as
    many candidates as it has already tried (1, 1, 2, 4, ...): a model fooled at an image's
    k-th candidate is then tried at most 2k times there, where an equal share of a batch with
    few images left spends hundreds of passes past the first fooling point. Exhaustive images
    take their whole share, since they try everything anyway.
    """
    a = searched.numel()
    share = pairs_per_batch // a
    quota = share + (torch.arange(a, device=searched.device) < pairs_per_batch - share * a).long()
    cap = torch.where(exhaustive, quota, searched.clamp(min=1))
    return torch.minimum(quota, cap)
