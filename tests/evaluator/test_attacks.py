"""Attacks and the defense: results that must not depend on how the search is run."""

import pytest
import torch
from torch import nn

from evaluator.attacks import Classifier, grid_pair_predictor, majority_vote
from evaluator.errors import ModelOutputError
from evaluator.search import CandidateOrder, search_candidates
from evaluator.transforms import FillMode, GridSpec, TransformBox, spatial_transform
from tests.evaluator.helpers import self_labelled, tiny_cnn

SMALL_GRID = GridSpec(TransformBox(30, 3, 3), 7, 3, 3)


def full_grid_correctness(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """The brute-force oracle: every image under every grid point, one point at a time."""
    columns = []
    with torch.no_grad():
        for point in SMALL_GRID.points():
            moved = spatial_transform(images, point.expand(len(images), 3))
            columns.append(model(moved).argmax(1) == labels)
    return torch.stack(columns, dim=1)


@pytest.fixture
def setup(device: torch.device):
    model = tiny_cnn()
    data = self_labelled(model, 120)
    clf = Classifier(model, 10, device=device, batch_size=64)
    return model, data, clf


def run_search(clf, data, *, exhaustive: bool, order: bool = True, pairs: int = 64):
    images, labels = data.images.to(clf.device), data.labels.to(clf.device)
    return search_candidates(
        grid_pair_predictor(clf, images, SMALL_GRID.points(), FillMode.ZEROS),
        labels,
        SMALL_GRID.size,
        pairs_per_batch=pairs,
        order=CandidateOrder(SMALL_GRID.prior_order()) if order else None,
        exhaustive=torch.full((len(labels),), exhaustive, device=clf.device),
    )


def test_exhaustive_search_matches_the_brute_force_oracle(setup) -> None:
    model, data, clf = setup
    outcome = run_search(clf, data, exhaustive=True)
    expected = full_grid_correctness(model, data.images, data.labels)
    assert torch.equal(outcome.correct.cpu(), expected)
    assert torch.equal(outcome.robust.cpu(), expected.all(dim=1))


def test_early_exit_gives_the_same_robust_set_with_fewer_passes(setup) -> None:
    _, data, clf = setup
    full = run_search(clf, data, exhaustive=True)
    early = run_search(clf, data, exhaustive=False)
    assert torch.equal(early.robust, full.robust)
    assert 0 < int(early.robust.sum()) < len(data)  # the test means something
    assert early.pairs < full.pairs


@pytest.mark.parametrize("pairs", [5, 500])
def test_batch_size_and_order_do_not_change_the_robust_set(setup, pairs: int) -> None:
    _, data, clf = setup
    reference = run_search(clf, data, exhaustive=True)
    for order in (True, False):
        outcome = run_search(clf, data, exhaustive=False, order=order, pairs=pairs)
        assert torch.equal(outcome.robust, reference.robust)


def test_first_fooling_point_really_fools(setup) -> None:
    model, data, clf = setup
    outcome = run_search(clf, data, exhaustive=False)
    fooled = (outcome.first_fool >= 0).cpu()
    points = SMALL_GRID.points()[outcome.first_fool.cpu()[fooled]]
    with torch.no_grad():
        preds = model(spatial_transform(data.images[fooled], points)).argmax(1)
    assert torch.equal(preds, outcome.fool_prediction.cpu()[fooled])
    assert (preds != data.labels[fooled]).all()


def test_early_exit_spends_at_most_twice_the_passes_to_the_first_fooling_point() -> None:
    """Each image is fooled first at its 1st or 4th candidate, but two resist them all. With
    early exit, an image fooled at its k-th candidate is tried at most 2k times, also when it
    reaches a late round with few images left, where an equal share of the batch would give it
    a dozen tries past its fooling point."""
    n, n_candidates = 70, 40
    labels = torch.zeros(n, dtype=torch.long)
    first = torch.where(torch.arange(n) % 7 == 0, 3, 0)
    robust = torch.arange(n) >= n - 2

    def predict(rows: torch.Tensor, cands: torch.Tensor) -> torch.Tensor:
        return ((cands >= first[rows]) & ~robust[rows]).long()

    outcome = search_candidates(predict, labels, n_candidates, pairs_per_batch=64)
    assert torch.equal(outcome.robust, robust)
    assert torch.equal(outcome.first_fool[~robust], first[~robust])
    tries = outcome.tried.sum(dim=1)
    assert (tries[~robust] <= 2 * (first[~robust] + 1)).all(), tries[~robust].tolist()
    assert (tries[robust] == n_candidates).all()
    assert outcome.pairs == int(tries.sum())


def test_known_identity_results_are_not_recomputed(setup) -> None:
    model, data, clf = setup
    images, labels = data.images.to(clf.device), data.labels.to(clf.device)
    natural_pred = clf.predict(images)[0]
    ident = SMALL_GRID.identity_index()
    assert ident is not None
    before = clf.forward_passes
    outcome = search_candidates(
        grid_pair_predictor(clf, images, SMALL_GRID.points(), FillMode.ZEROS),
        labels,
        SMALL_GRID.size,
        pairs_per_batch=64,
        known=(ident, natural_pred == labels, natural_pred),
        exhaustive=torch.ones(len(labels), dtype=torch.bool),
    )
    assert clf.forward_passes - before == len(labels) * (SMALL_GRID.size - 1)
    assert torch.equal(
        outcome.robust.cpu(), full_grid_correctness(model, data.images, data.labels).all(1)
    )


def test_adaptive_order_puts_the_most_fooling_points_first() -> None:
    order = CandidateOrder(torch.arange(5))
    order.update(torch.tensor([3, 3, 1]))
    assert order.ranking().tolist() == [3, 1, 0, 2, 4]


def test_majority_vote_takes_the_most_common_label() -> None:
    labels = torch.tensor([[2, 2, 1]])
    probs = torch.zeros(1, 3, 3)
    probs[0, 2, 1] = 1.0  # the lone vote for 1 is very confident; it still loses
    probs[0, :2, 2] = 0.4
    assert majority_vote(labels, probs).tolist() == [2]


def test_majority_vote_ties_go_to_the_highest_summed_softmax() -> None:
    labels = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1]])
    probs = torch.zeros(2, 4, 2)
    probs[0, :, 0] = torch.tensor([0.6, 0.6, 0.45, 0.45])  # label 0 sums 2.1 ...
    probs[0, :, 1] = 1 - probs[0, :, 0]  # ... label 1 sums 1.9
    probs[1, :, 0] = torch.tensor([0.51, 0.51, 0.1, 0.1])  # label 0 sums 1.22, label 1 2.78
    probs[1, :, 1] = 1 - probs[1, :, 0]
    assert majority_vote(labels, probs).tolist() == [0, 1]


class WrongShape(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(x.shape[0], 7)


class NaNLogits(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full((x.shape[0], 10), float("nan"))


def test_wrong_output_shape_is_reported_with_what_was_expected() -> None:
    with pytest.raises(ModelOutputError, match=r"expected logits of shape \(2, 10\)"):
        Classifier(WrongShape(), 10).predict(torch.rand(2, 3, 8, 8))


def test_nan_logits_are_reported() -> None:
    with pytest.raises(ModelOutputError, match="NaN"):
        Classifier(NaNLogits(), 10).predict(torch.rand(2, 3, 8, 8))


def test_forward_passes_are_counted(device: torch.device) -> None:
    clf = Classifier(tiny_cnn(), 10, device=device, batch_size=4)
    clf.predict(torch.rand(10, 3, 16, 16, device=device))
    assert clf.forward_passes == 10
