"""The paper's ablations: exact grids, the canvas geometry, and how an evaluation records them."""

from dataclasses import replace

import pytest
import torch
from torch import nn

from evaluator.ablations import Ablation, ablation_variant
from evaluator.attacks import Classifier
from evaluator.benchmarks import get_benchmark
from evaluator.evaluate import EvalOptions, Metric, evaluate
from evaluator.transforms import (
    FillMode,
    GridSpec,
    TransformBox,
    centre_on_canvas,
    spatial_transform,
)
from tests.evaluator.helpers import self_labelled, tiny_cnn

CIFAR_GRID = get_benchmark("cifar10").grid


def test_rotation_only_is_31_rotations_and_no_translation() -> None:
    variant = ablation_variant(Ablation.ROTATION_ONLY, CIFAR_GRID)
    assert variant.grid.shape == (31, 1, 1)
    expected = torch.stack(
        [torch.arange(-30, 31, 2, dtype=torch.float32), torch.zeros(31), torch.zeros(31)], dim=1
    )
    assert torch.equal(variant.grid.points(), expected)
    assert variant.fill is FillMode.ZEROS and variant.canvas == 1


def test_translation_only_is_5_by_5_translations_and_no_rotation() -> None:
    variant = ablation_variant(Ablation.TRANSLATION_ONLY, CIFAR_GRID)
    assert variant.grid.shape == (1, 5, 5)
    steps = [-3.0, -1.5, 0.0, 1.5, 3.0]
    expected = torch.tensor([[0.0, dx, dy] for dx in steps for dy in steps])
    assert torch.equal(variant.grid.points(), expected)


@pytest.mark.parametrize(
    ("ablation", "fill", "canvas"),
    [
        (Ablation.ZERO_FILL, FillMode.ZEROS, 1),
        (Ablation.REFLECTION, FillMode.REFLECTION, 1),
        (Ablation.BLACK_CANVAS, FillMode.ZEROS, 2),
    ],
)
def test_the_border_variants_keep_the_grid(ablation, fill, canvas) -> None:
    variant = ablation_variant(ablation, CIFAR_GRID)
    assert variant.grid == CIFAR_GRID and variant.fill is fill and variant.canvas == canvas


def test_every_variant_is_labelled_and_keeps_the_identity() -> None:
    labels = set()
    for ablation in Ablation:
        variant = ablation_variant(ablation, CIFAR_GRID)
        assert variant.grid.identity_index() is not None
        labels.add(variant.label)
    assert len(labels) == len(Ablation)


def test_the_identity_on_the_canvas_is_the_padded_image(device: torch.device) -> None:
    x = torch.rand(3, 3, 32, 32, device=device)
    canvas = centre_on_canvas(x)
    assert canvas.shape == (3, 3, 64, 64)
    assert torch.equal(canvas[..., 16:48, 16:48], x)
    outside = torch.ones_like(canvas, dtype=torch.bool)
    outside[..., 16:48, 16:48] = False
    assert bool((canvas[outside] == 0).all())  # zeros everywhere else
    assert torch.equal(spatial_transform(canvas, torch.zeros(3, 3)), canvas)


@pytest.mark.parametrize("quarter_turns", [1, 2, 3])
def test_a_quarter_turn_on_the_canvas_turns_the_image_about_its_own_centre(
    device: torch.device, quarter_turns: int
) -> None:
    x = torch.rand(2, 3, 32, 32, device=device)
    turned = spatial_transform(
        centre_on_canvas(x), torch.tensor([[90.0 * quarter_turns, 0, 0]] * 2)
    )
    assert torch.equal(turned, centre_on_canvas(torch.rot90(x, quarter_turns, dims=(-2, -1))))


def test_no_move_of_the_box_cuts_content_on_the_canvas() -> None:
    # A white image: whatever falls outside the 64x64 canvas would lower the total (bilinear
    # resampling of a turned square keeps it to within 0.1%).
    x = torch.ones(1, 1, 32, 32)
    corners = torch.tensor([[30.0, 3, 3], [-30.0, -3, 3], [30.0, -3, -3], [-30.0, 3, -3]])
    moved = spatial_transform(centre_on_canvas(x).expand(4, -1, -1, -1), corners)
    assert torch.allclose(moved.sum(dim=(1, 2, 3)), torch.full((4,), 1024.0), rtol=1e-3)
    cut = spatial_transform(x.expand(4, -1, -1, -1), corners)
    assert (cut.sum(dim=(1, 2, 3)) < 1000).all()  # on the image itself, corners are cut


BENCH = replace(
    get_benchmark("digits"),
    image_size=(16, 16),
    grid=GridSpec(TransformBox(30, 3, 3), 7, 3, 3),
    vote_subset=None,
    landscape_subset=0,
    first_order=False,
    ablations=(),
)
GRID_ONLY = frozenset({Metric.NATURAL, Metric.GRID})


class AnySize(nn.Module):
    """The tiny CNN's features pooled to a fixed map, so it takes the canvas too."""

    def __init__(self) -> None:
        super().__init__()
        cnn = tiny_cnn()
        self.features, self.head = cnn[:5], cnn[5:]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(nn.functional.adaptive_avg_pool2d(self.features(x), 8))


def full_grid_robust(model: nn.Module, images: torch.Tensor, labels, variant) -> torch.Tensor:
    """Brute force: the variant's every grid point on every (prepared) image."""
    prepared = variant.prepare(images)
    with torch.no_grad():
        columns = [
            model(spatial_transform(prepared, p.expand(len(images), 3), variant.fill)).argmax(1)
            == labels
            for p in variant.grid.points()
        ]
    return torch.stack(columns, dim=1).all(dim=1)


@pytest.fixture(scope="module")
def ablated():
    model = AnySize().eval()
    data = self_labelled(model, 30)
    options = EvalOptions(GRID_ONLY, ablations=frozenset(Ablation), ablation_subset=20)
    result = evaluate(Classifier(model, 10, batch_size=128), data, BENCH, options)
    return model, data, result


@pytest.mark.parametrize("ablation", list(Ablation))
def test_each_ablation_matches_its_brute_force_oracle(ablated, ablation) -> None:
    model, data, result = ablated
    variant = ablation_variant(ablation, BENCH.grid, BENCH.fill)
    ids = torch.tensor(result.per_image["index"][:20])
    expected = full_grid_robust(model, data.images[ids], data.labels[ids], variant)
    robust = result.per_image[f"ablation_{ablation.key}_robust"]
    assert robust[:20] == expected.long().tolist() and set(robust[20:]) == {-1}
    record = result.ablations[ablation.value]
    assert record["images"] == 20 and record["correct"] == int(expected.sum())
    assert record["accuracy"] == pytest.approx(int(expected.sum()) / 20)
    assert record["grid"] == list(variant.grid.shape) and record["fill"] == variant.fill.value
    assert record["canvas"] == variant.canvas and record["label"] == variant.label


def test_zero_fill_is_the_benchmark_grid_and_is_not_run_twice(ablated) -> None:
    _, _, result = ablated
    record = result.ablations["zero-fill"]
    assert record["reused_grid"] and record["forward_passes"] == 0
    assert (
        result.per_image["ablation_zero_fill_robust"][:20] == result.per_image["grid_robust"][:20]
    )


def test_the_canvas_records_accuracy_on_the_padded_image(ablated) -> None:
    model, data, result = ablated
    ids = torch.tensor(result.per_image["index"][:20])
    with torch.no_grad():
        padded = model(centre_on_canvas(data.images[ids])).argmax(1) == data.labels[ids]
    assert result.ablations["black-canvas"]["natural"] == pytest.approx(
        float(padded.float().mean())
    )


def test_ablations_run_only_when_asked() -> None:
    model = tiny_cnn()
    result = evaluate(
        Classifier(model, 10), self_labelled(model, 10), BENCH, EvalOptions(GRID_ONLY)
    )
    assert result.ablations == {} and "ablations" not in result.forward_passes
    assert not any(key.startswith("ablation_") for key in result.per_image)


def test_a_model_that_refuses_the_canvas_size_is_reported_for_that_ablation_only() -> None:
    model = tiny_cnn()  # its linear head takes 16x16 inputs only
    options = EvalOptions(
        GRID_ONLY, ablations=frozenset({Ablation.BLACK_CANVAS, Ablation.REFLECTION})
    )
    result = evaluate(Classifier(model, 10), self_labelled(model, 10), BENCH, options)
    assert "32x32" in result.ablations["black-canvas"]["error"]
    assert result.ablations["reflection"]["images"] == 10
