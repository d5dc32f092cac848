"""The first-order attack: it finds what the grid misses, stays in the box, never beats natural
accuracy, repeats itself with the seed, and says so when a model has no gradient."""

from dataclasses import replace

import pytest
import torch
from torch import Tensor, nn

from evaluator.attacks import Classifier
from evaluator.benchmarks import get_benchmark
from evaluator.errors import ModelNotDifferentiableError
from evaluator.evaluate import EvalOptions, Metric, evaluate
from evaluator.first_order import FirstOrderConfig, FirstOrderOutcome, first_order_attack
from evaluator.transforms import GridSpec, TransformBox, spatial_transform
from tests.evaluator.helpers import self_labelled, tiny_cnn
from tests.evaluator.spatial_models import pixel_coordinates

GRID = GridSpec(TransformBox(30, 3, 3), 7, 3, 3)  # thetas -30, -20, ..., 30
BOX = GRID.box
BENCH = replace(
    get_benchmark("digits"),
    image_size=(16, 16),
    grid=GRID,
    vote_subset=None,
    landscape_subset=0,
    first_order=True,
    first_order_subset=None,
    ablations=(),
)
GRID_ONLY = frozenset({Metric.NATURAL, Metric.GRID})


def two_blobs(size: int = 24, sigma: float = 2.0) -> Tensor:
    """One (1, 3, size, size) image of two Gaussian blobs, placed so that no translation can
    stand in for a rotation."""
    ys, xs = pixel_coordinates(size, size)
    blob = torch.exp(-((xs - 8) ** 2 + ys**2) / (2 * sigma**2))
    blob = blob + torch.exp(-((xs + 4) ** 2 + (ys - 5) ** 2) / (2 * sigma**2))
    return blob[None, None].expand(1, 3, size, size).contiguous()


class TemplateMatch(nn.Module):
    """Class 0 unless the input matches ``template`` closely (normalised correlation above
    ``threshold``), then class 1: fooled only near the move that made the template."""

    def __init__(self, template: Tensor, threshold: float) -> None:
        super().__init__()
        self.register_buffer("template", template)
        self.threshold = threshold

    def correlation(self, x: Tensor) -> Tensor:
        t: Tensor = self.template  # type: ignore[assignment]
        return (x * t).sum(dim=(1, 2, 3)) / (t * t).sum()

    def forward(self, x: Tensor) -> Tensor:
        match = 100 * (self.correlation(x) - self.threshold)
        rest = torch.full((x.shape[0], 8), -1e3, dtype=x.dtype, device=x.device)
        return torch.cat([torch.zeros_like(match)[:, None], match[:, None], rest], dim=1)


def off_grid_trap(target: tuple[float, float, float]) -> tuple[TemplateMatch, Tensor]:
    """A model fooled only near ``target`` and an image it classifies correctly (class 0)
    everywhere on the grid: the threshold sits halfway between the best grid point's match
    and the perfect match at the target."""
    image = two_blobs()
    template = spatial_transform(image, torch.tensor([target]))
    model = TemplateMatch(template, 0.0)
    points = GRID.points()
    with torch.no_grad():
        grid_best = float(
            model.correlation(
                spatial_transform(image.expand(len(points), -1, -1, -1), points)
            ).max()
        )
    model.threshold = (grid_best + 1.0) / 2
    return model.eval(), image


def attack(model: nn.Module, images: Tensor, labels: Tensor, **kwargs) -> FirstOrderOutcome:
    ids = torch.arange(len(labels))
    return first_order_attack(
        Classifier(model, 10, batch_size=64), images, labels, ids, BOX, **kwargs
    )


def test_finds_an_off_grid_worst_case_that_the_grid_misses() -> None:
    model, image = off_grid_trap((15.0, 0.0, 0.0))
    points = GRID.points()
    with torch.no_grad():
        on_grid = model(spatial_transform(image.expand(len(points), -1, -1, -1), points))
    assert (on_grid.argmax(dim=1) == 0).all()  # the grid never fools it

    outcome = attack(model, image, torch.tensor([0]), seed=0)
    assert outcome.correct.tolist() == [False]
    theta, dx, dy = outcome.point[0].tolist()
    assert abs(theta - 15) < 2 and abs(dx) < 0.5 and abs(dy) < 0.5


def test_a_worst_case_outside_the_box_pins_the_attack_to_the_edge() -> None:
    model, image = off_grid_trap((60.0, 0.0, 0.0))
    outcome = attack(model, image, torch.tensor([0]), seed=0)
    assert outcome.point[0, 0] == 30.0  # clipped exactly at the limit, not beyond


def test_stays_inside_the_box() -> None:
    model = tiny_cnn()
    data = self_labelled(model, 40)
    outcome = attack(model, data.images, data.labels, seed=0)
    limits = BOX.limits().float()
    assert (outcome.point.abs() <= limits).all()


def test_is_reproducible_with_the_seed_and_starts_elsewhere_with_another() -> None:
    model = tiny_cnn()
    data = self_labelled(model, 12)
    first = attack(model, data.images, data.labels, seed=3)
    again = attack(model, data.images, data.labels, seed=3)
    other = attack(model, data.images, data.labels, seed=4)
    assert torch.equal(first.point, again.point) and torch.equal(first.correct, again.correct)
    assert not torch.equal(first.point, other.point)


@pytest.fixture(scope="module")
def evaluated():
    model = tiny_cnn()
    data = self_labelled(model, 40)
    clf = Classifier(model, 10, batch_size=64)
    return evaluate(clf, data, BENCH, EvalOptions(GRID_ONLY))


def test_never_reports_above_natural_accuracy_image_by_image(evaluated) -> None:
    natural = torch.tensor(evaluated.per_image["natural_correct"])
    first_order = torch.tensor(evaluated.per_image["first_order_correct"])
    assert (first_order <= natural).all()
    # The flipped labels: wrong at the identity, so fooled whatever the ascent found.
    flipped = torch.tensor(evaluated.per_image["index"]) % 10 == 3
    assert (first_order[flipped] == 0).all()


def test_is_reported_with_its_settings_and_its_gap_to_the_grid(evaluated) -> None:
    doc = evaluated.to_dict()
    value = doc["metrics"]["first_order"]
    assert value["images"] == 40
    assert value["gap_to_grid"] == pytest.approx(
        value["accuracy"] - doc["metrics"]["grid"]["accuracy"]
    )
    config = doc["config"]["first_order"]
    assert config["steps"] == 20 and config["restarts"] == 3
    assert config["theta_step"] == 3.0 and config["translation_step"] == [0.3, 0.3]


def test_forward_passes_are_counted(evaluated) -> None:
    config = FirstOrderConfig()
    per_image = config.restarts * (config.steps + 1) + 1
    assert evaluated.forward_passes["first-order"] == 40 * per_image


def test_a_subset_and_the_option_decide_where_it_runs() -> None:
    model = tiny_cnn()
    data = self_labelled(model, 20)
    options = EvalOptions(GRID_ONLY, first_order_subset=5)
    result = evaluate(Classifier(model, 10), data, BENCH, options)
    assert result.metrics["first_order"].total == 5
    off = evaluate(Classifier(model, 10), data, BENCH, EvalOptions(GRID_ONLY, first_order=False))
    assert "first_order" not in off.metrics and "first-order" not in off.forward_passes


class _Remote(torch.autograd.Function):
    """Logits from a module the caller cannot see into: forward without a graph, backward as
    a vector-Jacobian product computed on request (as a model in another process answers)."""

    @staticmethod
    def forward(ctx, x: Tensor, module: nn.Module) -> Tensor:
        ctx.save_for_backward(x)
        ctx.module = module
        with torch.no_grad():
            return module(x)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (x,) = ctx.saved_tensors
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            out = ctx.module(x)
            (grad_x,) = torch.autograd.grad(out, x, grad_out)
        return grad_x, None


class RemoteModel(nn.Module):
    """No parameters of its own: the model lives elsewhere."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.__dict__["hidden"] = module  # not registered: no parameters, no .to()

    def forward(self, x: Tensor) -> Tensor:
        return _Remote.apply(x, self.hidden)


def test_works_through_a_model_with_no_parameters_and_a_vjp_backward() -> None:
    local = tiny_cnn()
    data = self_labelled(local, 10)
    remote = RemoteModel(local)
    assert not list(remote.parameters())
    expected = attack(local, data.images, data.labels, seed=0)
    got = attack(remote, data.images, data.labels, seed=0)
    assert torch.equal(got.correct, expected.correct)
    assert torch.allclose(got.point, expected.point)
    assert all(p.grad is None for p in local.parameters())


class Detached(nn.Module):
    """Answers through a path autograd cannot follow."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = tiny_cnn()

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x.detach())


class RefusesBackward(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return _Refusing.apply(x)


class _Refusing(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.mean(dim=(2, 3)).repeat(1, 4)[:, :10]

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        raise ModelNotDifferentiableError("the exported program has no backward for this op")


@pytest.mark.parametrize(
    ("model", "reason"),
    [
        (Detached(), "differentiated with respect to its input"),
        (RefusesBackward(), "no backward for this op"),
    ],
    ids=["detached", "refusing"],
)
def test_a_model_without_a_gradient_is_reported_as_such_not_as_a_number(model, reason) -> None:
    data = self_labelled(tiny_cnn(), 10)
    result = evaluate(Classifier(model.eval(), 10), data, BENCH, EvalOptions(GRID_ONLY))
    doc = result.to_dict()
    value = doc["metrics"]["first_order"]
    assert value["accuracy"] is None and value["images"] == 0 and reason in value["error"]
    assert result.accuracy("first_order") is None
    assert doc["metrics"]["grid"]["images"] == 10  # everything else is measured
    assert set(result.per_image["first_order_correct"]) == {-1}
