"""The threat model's geometry, held to exact oracles."""

import doctest

import pytest
import torch

from evaluator import transforms
from evaluator.transforms import (
    FillMode,
    GridSpec,
    TransformBox,
    affine_matrices,
    differentiable_transform,
    spatial_transform,
    transform_product,
    uniform_transforms,
)


def params(theta: float, dx: float, dy: float, n: int = 1) -> torch.Tensor:
    return torch.tensor([[theta, dx, dy]] * n)


def zero_filled_shift(x: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    out = torch.zeros_like(x)
    h, w = x.shape[-2:]
    out[..., max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = x[
        ..., max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return out


def test_docstring_examples_hold() -> None:
    assert doctest.testmod(transforms).failed == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_identity_is_bit_exact(device: torch.device, dtype: torch.dtype) -> None:
    x = torch.rand(5, 3, 13, 17, dtype=dtype, device=device)
    assert torch.equal(spatial_transform(x, torch.zeros(5, 3)), x)


def test_identity_rows_are_bit_exact_in_a_mixed_batch(device: torch.device) -> None:
    x = torch.rand(3, 3, 9, 9, device=device)
    out = spatial_transform(x, torch.tensor([[0.0, 0, 0], [10.0, 1, 0], [0.0, 0, 0]]))
    assert torch.equal(out[0], x[0]) and torch.equal(out[2], x[2])
    assert not torch.equal(out[1], x[1])


@pytest.mark.parametrize("size", [7, 8, 28, 32])
@pytest.mark.parametrize("quarter_turns", [1, 2, 3, -1])
def test_quarter_turns_equal_rot90_exactly(
    device: torch.device, size: int, quarter_turns: int
) -> None:
    x = torch.rand(4, 3, size, size, device=device)
    out = spatial_transform(x, params(90.0 * quarter_turns, 0, 0, 4))
    assert torch.equal(out, torch.rot90(x, quarter_turns, dims=(-2, -1)))


@pytest.mark.parametrize(("dx", "dy"), [(1, 0), (0, 1), (-2, 3), (3, -1), (0, -3)])
def test_integer_shifts_equal_a_zero_filled_shift(device: torch.device, dx: int, dy: int) -> None:
    x = torch.rand(2, 3, 16, 16, device=device)
    assert torch.equal(spatial_transform(x, params(0, dx, dy, 2)), zero_filled_shift(x, dx, dy))


@pytest.mark.parametrize(("h", "w"), [(8, 16), (6, 6), (28, 28), (21, 13)])
def test_integer_shift_on_any_image_size(device: torch.device, h: int, w: int) -> None:
    x = torch.rand(1, 1, h, w, device=device)
    assert torch.equal(spatial_transform(x, params(0, 2, -1)), zero_filled_shift(x, 2, -1))


def asymmetric_image() -> torch.Tensor:
    """A 5x5 grey image, one bright pixel right of the centre."""
    x = torch.zeros(1, 1, 5, 5)
    x[0, 0, 2, 3] = 1.0
    return x


def bright_pixel(x: torch.Tensor) -> tuple[int, int]:
    row, col = divmod(int(x.flatten().argmax()), x.shape[-1])
    return row, col


def test_positive_rotation_is_counter_clockwise_as_displayed() -> None:
    # Right of centre, turned a quarter counter-clockwise on screen, ends up above the centre.
    assert bright_pixel(spatial_transform(asymmetric_image(), params(90, 0, 0))) == (1, 2)


def test_small_positive_rotation_lifts_the_right_side() -> None:
    x = torch.zeros(1, 1, 21, 21)
    x[0, 0, 10, 18] = 1.0
    out = spatial_transform(x, params(20, 0, 0))
    row, col = bright_pixel(out)
    assert row == 7 and col in (17, 18)  # (8, 0) from the centre -> (7.5, -2.7)


def test_positive_dx_moves_content_right_and_positive_dy_moves_it_down() -> None:
    assert bright_pixel(spatial_transform(asymmetric_image(), params(0, 1, 0))) == (2, 4)
    assert bright_pixel(spatial_transform(asymmetric_image(), params(0, 0, 1))) == (3, 3)


def test_rotation_comes_before_translation() -> None:
    # Rotate (2,3) -> (1,2), then move right by one: (1,3). Translating first would give (0,2).
    assert bright_pixel(spatial_transform(asymmetric_image(), params(90, 1, 0))) == (1, 3)


def test_zero_fill_is_black_and_border_fill_repeats_the_edge() -> None:
    x = torch.ones(1, 1, 6, 6)
    shifted = params(0, 2, 0)
    assert spatial_transform(x, shifted)[0, 0, :, :2].eq(0).all()
    assert spatial_transform(x, shifted, FillMode.BORDER).eq(1).all()
    assert spatial_transform(x, shifted, "reflection").eq(1).all()


def test_half_pixel_shift_averages_neighbours() -> None:
    x = torch.tensor([[[[0.0, 1.0, 0.0, 0.0]]]])
    out = spatial_transform(x, params(0, 0.5, 0))
    torch.testing.assert_close(out, torch.tensor([[[[0.0, 0.5, 0.5, 0.0]]]]))


def test_product_applies_every_transformation_to_every_image(device: torch.device) -> None:
    x = torch.rand(3, 3, 8, 8, device=device)
    p = torch.tensor([[0.0, 0, 0], [90.0, 0, 0], [0.0, 1, 0], [12.5, -0.5, 2.0]])
    out = transform_product(x, p)
    assert out.shape == (3, 4, 3, 8, 8)
    for i in range(3):
        for t in range(4):
            assert torch.equal(out[i, t], spatial_transform(x[i : i + 1], p[t : t + 1])[0])


def test_rejects_malformed_parameters() -> None:
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        spatial_transform(torch.rand(2, 1, 4, 4), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="2 images but 3"):
        spatial_transform(torch.rand(2, 1, 4, 4), torch.zeros(3, 3))


def test_cifar_grid_has_775_points_with_the_identity_on_it() -> None:
    grid = GridSpec(TransformBox(30, 3, 3))
    thetas, dxs, _ = grid.axes()
    assert grid.size == 775 and grid.points().shape == (775, 3)
    assert dxs.tolist() == [-3.0, -1.5, 0.0, 1.5, 3.0]
    assert thetas[0] == -30 and thetas[-1] == 30 and thetas[1] - thetas[0] == 2
    ident = grid.identity_index()
    assert ident is not None and grid.points()[ident].eq(0).all()


def test_grid_order_is_theta_major() -> None:
    grid = GridSpec()
    p = grid.points().view(31, 5, 5, 3)
    assert p[3, 1, 4].tolist() == [-24.0, -1.5, 3.0]


def test_prior_order_is_a_permutation_starting_at_the_identity() -> None:
    grid = GridSpec()
    order = grid.prior_order()
    assert sorted(order.tolist()) == list(range(775))
    assert int(order[0]) == grid.identity_index()


def test_uniform_draws_stay_in_the_box_and_cover_it() -> None:
    box = TransformBox(30, 3, 2)
    draws = uniform_transforms(box, seed=0, stream=1, image_ids=torch.arange(2000), n_draws=10)
    flat = draws.view(-1, 3)
    assert draws.shape == (2000, 10, 3)
    assert (flat.abs() <= torch.tensor([30.0, 3.0, 2.0])).all()
    assert (flat.amax(0) > torch.tensor([29.9, 2.99, 1.99])).all()
    assert (flat.amin(0) < -torch.tensor([29.9, 2.99, 1.99])).all()
    assert flat.mean(0).abs().max() < 0.5


def test_uniform_draws_depend_only_on_their_keys(device: torch.device) -> None:
    box = TransformBox()
    a = uniform_transforms(box, 7, 1, torch.tensor([5, 9, 11], device=device), 4)
    b = uniform_transforms(box, 7, 1, torch.tensor([11, 5], device=device), 4)
    assert torch.equal(a[0], b[1]) and torch.equal(a[2], b[0])
    assert not torch.equal(a, uniform_transforms(box, 8, 1, torch.tensor([5, 9, 11]), 4))
    assert not torch.equal(a, uniform_transforms(box, 7, 2, torch.tensor([5, 9, 11]), 4))


def test_uniform_draws_differ_per_slot() -> None:
    ids = torch.tensor([3, 3])
    draws = uniform_transforms(TransformBox(), 0, 3, ids, 10, slot=torch.tensor([0, 1]))
    assert not torch.equal(draws[0], draws[1])
    same = uniform_transforms(TransformBox(), 0, 3, ids[:1], 10, slot=1)
    assert torch.equal(same[0], draws[1])


@pytest.mark.parametrize("theta", [0.0, 90.0, 180.0, -90.0, 30.0, 17.3])
def test_matrices_with_gradients_keep_the_exact_values(theta: float) -> None:
    p = torch.tensor([[theta, 1.5, -2.0]])
    assert torch.equal(
        affine_matrices(p.clone().requires_grad_(True), 9, 7).detach(), affine_matrices(p, 9, 7)
    )


@pytest.mark.parametrize("move", [(0.0, 0.0, 0.0), (90.0, 1.0, -2.0), (12.5, 0.7, -1.3)])
def test_the_differentiable_transform_has_the_same_geometry(
    device: torch.device, move: tuple[float, float, float]
) -> None:
    x = torch.rand(2, 3, 12, 12, device=device)
    p = torch.tensor([move] * 2)
    expected = spatial_transform(x, p)
    assert torch.allclose(differentiable_transform(x, p), expected, atol=1e-5)


def test_gradients_reach_every_parameter_even_at_the_identity() -> None:
    x = torch.zeros(1, 1, 9, 9)
    x[0, 0, 2, 6] = 1.0  # off-centre, so turning and shifting both move it
    weight = torch.rand(1, 1, 9, 9, generator=torch.Generator().manual_seed(0))
    p = torch.zeros(1, 3, requires_grad=True)
    (differentiable_transform(x, p) * weight).sum().backward()
    assert p.grad is not None and (p.grad != 0).all()
