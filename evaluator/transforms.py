"""Rotations and translations of image batches: the threat model, written down once.

Convention (DESIGN.md, "The threat model"):

- Images are float tensors ``(N, C, H, W)`` with values in ``[0, 1]``, before normalisation.
- A transformation is ``(theta, dx, dy)``: ``theta`` in degrees, positive turns the content
  counter-clockwise *as displayed* (row 0 at the top); ``dx`` and ``dy`` in pixels, positive
  ``dx`` moves the content right, positive ``dy`` moves it down.
- Rotation is about the image centre and comes first; the translation follows. The whole
  transformation is one affine resampling (bilinear, ``align_corners=False`` so that one pixel
  is one pixel), filled with zeros (black) outside the image unless another `FillMode` is given.

Exact oracles (held by the tests): the identity returns its input bit for bit; ``theta=90``
equals ``torch.rot90(x, 1, dims=(-2, -1))`` on square images; integer ``dx``/``dy`` equal a
zero-filled shift.

>>> import torch
>>> x = torch.zeros(1, 1, 3, 3); x[0, 0, 1, 0] = 1.0          # a dot left of the centre
>>> spatial_transform(x, torch.tensor([[0.0, 1.0, 0.0]]))[0, 0]  # dx=+1 moves it right
tensor([[0., 0., 0.],
        [0., 1., 0.],
        [0., 0., 0.]])
>>> spatial_transform(x, torch.tensor([[90.0, 0.0, 0.0]]))[0, 0]  # +90 deg: left goes down
tensor([[0., 0., 0.],
        [0., 0., 0.],
        [0., 1., 0.]])
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "FillMode",
    "TransformBox",
    "GridSpec",
    "affine_matrices",
    "centre_on_canvas",
    "differentiable_transform",
    "spatial_transform",
    "transform_product",
    "uniform_transforms",
]


class FillMode(StrEnum):
    """What the resampling reads outside the image."""

    ZEROS = "zeros"
    BORDER = "border"
    REFLECTION = "reflection"


def _cos_sin_degrees(theta: Tensor) -> tuple[Tensor, Tensor]:
    """cos and sin of angles in degrees, exact at multiples of 90 degrees.

    Computed in float64 and snapped, so that a quarter turn resamples exactly onto pixel
    centres instead of 6e-17 away from them.
    """
    rad = torch.deg2rad(theta.to(torch.float64))
    raw_cos, raw_sin = torch.cos(rad), torch.sin(rad)
    eps = 1e-12
    cos = torch.where(raw_cos.abs() < eps, torch.zeros_like(raw_cos), raw_cos)
    sin = torch.where(raw_sin.abs() < eps, torch.zeros_like(raw_sin), raw_sin)
    cos = torch.where((cos.abs() - 1).abs() < eps, cos.sign(), cos)
    sin = torch.where((sin.abs() - 1).abs() < eps, sin.sign(), sin)
    if theta.requires_grad:
        # The snapped branch is constant, so a gradient attack starting at 0 degrees would
        # never turn: pass the unsnapped derivative through. ``raw + (snapped - raw)`` is
        # exactly ``snapped`` here, as the two differ by less than 1e-12.
        cos = raw_cos + (cos - raw_cos).detach()
        sin = raw_sin + (sin - raw_sin).detach()
    return cos, sin


def affine_matrices(params: Tensor, height: int, width: int) -> Tensor:
    """The ``(N, 2, 3)`` matrices for `torch.nn.functional.affine_grid`, in float64.

    ``params`` is ``(N, 3)``: ``theta`` (degrees), ``dx``, ``dy`` (pixels). A matrix maps an
    output location to the input location it reads, in normalised coordinates (``-1`` and ``+1``
    are the outer edges of the image, ``align_corners=False``).

    With pixel coordinates about the centre (``y`` down), the content moves by
    ``p_out = R p_in + t`` where ``R = [[c, s], [-s, c]]`` (counter-clockwise as displayed) and
    ``t = (dx, dy)``; the sampler needs the inverse, ``p_in = R^T (p_out - t)``, rescaled from
    pixels to normalised units per axis so non-square images rotate without shear.
    """
    if params.ndim != 2 or params.shape[1] != 3:
        raise ValueError(
            f"params must have shape (N, 3) as (theta, dx, dy), got {tuple(params.shape)}"
        )
    theta, dx, dy = params.to(torch.float64).unbind(1)
    c, s = _cos_sin_degrees(theta)
    sx, sy = 2.0 / width, 2.0 / height  # pixels -> normalised units
    row_x = torch.stack([c, -s * height / width, sx * (-c * dx + s * dy)], dim=1)
    row_y = torch.stack([s * width / height, c, sy * (-s * dx - c * dy)], dim=1)
    return torch.stack([row_x, row_y], dim=1)


def spatial_transform(
    images: Tensor, params: Tensor, fill: FillMode | str = FillMode.ZEROS
) -> Tensor:
    """Apply one transformation per image: ``images`` ``(N, C, H, W)``, ``params`` ``(N, 3)``.

    Row ``i`` of ``params`` is ``(theta_deg, dx_px, dy_px)`` for image ``i``. Returns a new
    ``(N, C, H, W)`` tensor of the same dtype and device. Rows equal to ``(0, 0, 0)`` come back
    bit-exact.
    """
    if images.ndim != 4:
        raise ValueError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}")
    if params.shape[0] != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {params.shape[0]} transformations")
    n, c, h, w = images.shape
    if n == 0:
        return images.clone()
    fill = FillMode(fill)
    matrices = affine_matrices(params, h, w).to(images.device)
    aligned = _pixel_aligned(params).to(images.device)
    if images.dtype == torch.float64 or bool(aligned.all()):
        out = _resample(images, matrices, fill, exact=True)
    elif not bool(aligned.any()):
        out = _resample(images, matrices, fill, exact=False)
    else:
        out = torch.empty_like(images)
        rows = aligned.nonzero().squeeze(1)
        out[rows] = _resample(images[rows], matrices[rows], fill, exact=True)
        rows = (~aligned).nonzero().squeeze(1)
        out[rows] = _resample(images[rows], matrices[rows], fill, exact=False)
    identity = (params == 0).all(dim=1).to(images.device)
    if bool(identity.any()):
        out = torch.where(identity[:, None, None, None], images, out)
    return out


def differentiable_transform(
    images: Tensor, params: Tensor, fill: FillMode | str = FillMode.ZEROS
) -> Tensor:
    """`spatial_transform` with gradients: the same geometry, differentiable in ``params``.

    ``images`` ``(N, C, H, W)`` and ``params`` ``(N, 3)`` as ``(theta_deg, dx_px, dy_px)``;
    gradients flow to both. Every row is resampled in the images' dtype: no bit-exact path
    for pixel-aligned moves and no identity shortcut (both would cut the gradient), so at
    such points the result differs from `spatial_transform` by rounding (about 1e-7 in
    float32). For the first-order attack; the grid uses `spatial_transform`.
    """
    if images.ndim != 4:
        raise ValueError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}")
    if params.shape[0] != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {params.shape[0]} transformations")
    h, w = images.shape[-2:]
    matrices = affine_matrices(params, h, w).to(images.device)
    grid = _sampling_grid(matrices, h, w, images.dtype)
    return F.grid_sample(images, grid, "bilinear", FillMode(fill).value, align_corners=False)


def centre_on_canvas(images: Tensor, factor: int = 2) -> Tensor:
    """The images centred on a zero (black) canvas ``factor`` times their side.

    ``(N, C, H, W) -> (N, C, factor*H, factor*W)``, the image occupying rows
    ``(factor-1)*H//2`` onwards (columns likewise). With even padding the image centre is the
    canvas centre, so a rotation about the canvas centre turns the image about its own centre,
    and a box of moves that keeps the image inside the canvas never cuts content. Pixels stay
    pixels: a translation of ``dx`` moves the content ``dx`` pixels on the canvas too.

    >>> centre_on_canvas(torch.ones(1, 1, 2, 2))[0, 0]
    tensor([[0., 0., 0., 0.],
            [0., 1., 1., 0.],
            [0., 1., 1., 0.],
            [0., 0., 0., 0.]])
    """
    if factor < 1:
        raise ValueError(f"the canvas factor must be at least 1, got {factor}")
    h, w = images.shape[-2:]
    extra_h, extra_w = (factor - 1) * h, (factor - 1) * w
    top, left = extra_h // 2, extra_w // 2
    return F.pad(images, (left, extra_w - left, top, extra_h - top))


def _sampling_grid(matrices: Tensor, height: int, width: int, dtype: torch.dtype) -> Tensor:
    """``affine_grid(matrices, align_corners=False)`` in ``dtype``, by broadcasting.

    The same numbers as `torch.nn.functional.affine_grid`, several times faster on a CPU: that
    one multiplies a ``(N, H*W, 3)`` base grid by every matrix, this one adds two scaled axes.
    """
    xs = (torch.arange(width, device=matrices.device, dtype=torch.float64) * 2 + 1) / width - 1
    ys = (torch.arange(height, device=matrices.device, dtype=torch.float64) * 2 + 1) / height - 1
    xs, ys = xs.to(dtype), ys.to(dtype)
    m = matrices.to(dtype)[:, :, :, None, None]  # (N, 2, 3, 1, 1)
    grid = m[:, :, 0] * xs.view(1, 1, 1, width) + m[:, :, 1] * ys.view(1, 1, height, 1) + m[:, :, 2]
    return grid.permute(0, 2, 3, 1)  # (N, H, W, 2): x then y, as grid_sample reads it


def _pixel_aligned(params: Tensor) -> Tensor:
    """Rows whose move maps pixel centres onto pixel centres: quarter turns, whole pixels."""
    theta, dx, dy = params.unbind(1)
    return (torch.remainder(theta, 90) == 0) & (dx == dx.round()) & (dy == dy.round())


def _resample(images: Tensor, matrices: Tensor, fill: FillMode, *, exact: bool) -> Tensor:
    """Bilinear sampling of ``images`` through the ``(N, 2, 3)`` float64 ``matrices``.

    ``exact`` samples in float64 and rounds back once: a pixel-aligned move then lands on
    pixel centres to within 1e-16 of a pixel, which the final rounding removes (and the flush,
    where the exact answer is a zero fill), so integer shifts and quarter turns are bit-exact
    on every image size. In float32 the sampler's own coordinate arithmetic leaves about 1e-7
    of the neighbouring pixels on sizes that are not powers of two; for moves that interpolate
    anyway that is far below anything a model sees, and float32 is what keeps resampling cheap
    next to a forward pass.
    """
    h, w = images.shape[-2:]
    if exact:
        grid = _sampling_grid(matrices, h, w, torch.float64)
        out = F.grid_sample(
            images.to(torch.float64), grid, "bilinear", fill.value, align_corners=False
        )
        return torch.where(out.abs() < 1e-12, 0.0, out).to(images.dtype)
    grid = _sampling_grid(matrices, h, w, images.dtype)
    return F.grid_sample(images, grid, "bilinear", fill.value, align_corners=False)


def transform_product(
    images: Tensor, params: Tensor, fill: FillMode | str = FillMode.ZEROS
) -> Tensor:
    """Every image under every transformation: ``(N, C, H, W) x (T, 3) -> (N, T, C, H, W)``.

    One batched resampling, no Python loop over images or transformations.
    """
    n, t = images.shape[0], params.shape[0]
    flat_images = (
        images.unsqueeze(1).expand(n, t, *images.shape[1:]).reshape(n * t, *images.shape[1:])
    )
    flat_params = params.unsqueeze(0).expand(n, t, 3).reshape(n * t, 3)
    return spatial_transform(flat_images, flat_params, fill).view(n, t, *images.shape[1:])


@dataclass(frozen=True)
class TransformBox:
    """The set of allowed transformations: ``|theta| <= max_rotation`` degrees and
    ``|dx| <= max_dx``, ``|dy| <= max_dy`` pixels."""

    max_rotation: float = 30.0
    max_dx: float = 3.0
    max_dy: float = 3.0

    def limits(self) -> Tensor:
        return torch.tensor([self.max_rotation, self.max_dx, self.max_dy], dtype=torch.float64)

    def scale(self, unit: Tensor) -> Tensor:
        """Map draws in ``[0, 1)^3`` (last axis = theta, dx, dy) uniformly onto the box."""
        limits = self.limits().to(unit.device, torch.float64)
        return ((unit.to(torch.float64) * 2 - 1) * limits).to(torch.float32)


@dataclass(frozen=True)
class GridSpec:
    """The exhaustive grid: ``linspace(-limit, +limit, n)`` per axis, theta-major order.

    Point ``g`` is ``(thetas[i], dxs[j], dys[k])`` with ``g = (i * n_dx + j) * n_dy + k``, so
    ``accuracy.reshape(n_theta, n_dx, n_dy)`` is the landscape. With odd counts the identity is
    a grid point.
    """

    box: TransformBox = TransformBox()
    n_theta: int = 31
    n_dx: int = 5
    n_dy: int = 5

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.n_theta, self.n_dx, self.n_dy)

    @property
    def size(self) -> int:
        return self.n_theta * self.n_dx * self.n_dy

    def axes(self) -> tuple[Tensor, Tensor, Tensor]:
        """The values along each axis, float64: thetas (degrees), dxs, dys (pixels)."""
        b = self.box
        return (
            torch.linspace(-b.max_rotation, b.max_rotation, self.n_theta, dtype=torch.float64),
            torch.linspace(-b.max_dx, b.max_dx, self.n_dx, dtype=torch.float64),
            torch.linspace(-b.max_dy, b.max_dy, self.n_dy, dtype=torch.float64),
        )

    def points(self) -> Tensor:
        """All grid points as a ``(size, 3)`` float32 tensor in theta-major order."""
        thetas, dxs, dys = self.axes()
        mesh = torch.meshgrid(thetas, dxs, dys, indexing="ij")
        return torch.stack([m.reshape(-1) for m in mesh], dim=1).to(torch.float32)

    def identity_index(self) -> int | None:
        """Index of ``(0, 0, 0)`` on the grid, or None when it is not a grid point."""
        hits = (self.points() == 0).all(dim=1).nonzero()
        return int(hits[0]) if len(hits) else None

    def prior_order(self) -> Tensor:
        """The order to try points before anything has been learned: the identity first (it
        settles every image the model gets wrong anyway), then the largest moves, which fool
        standard models most often."""
        p = self.points().to(torch.float64)
        limits = self.box.limits().clamp_min(1e-12)
        magnitude = (p.abs() / limits).pow(2) @ torch.tensor([4.0, 1.0, 1.0], dtype=torch.float64)
        order = torch.argsort(-magnitude, stable=True)
        ident = self.identity_index()
        if ident is not None:
            order = torch.cat([torch.tensor([ident]), order[order != ident]])
        return order


# ---------------------------------------------------------------------------------------------
# Reproducible uniform draws.
#
# Every random transformation is a pure function of (seed, stream, image index, slot, draw):
# a counter-based hash rather than a stateful generator, so results do not depend on batch
# sizes, the order images are processed in, early exit, or how an evaluation is split into
# shards. 32-bit arithmetic is carried in int64 with explicit masks, identical on CPU and CUDA.
# ---------------------------------------------------------------------------------------------

_MASK32 = 0xFFFFFFFF


def _mul32(x: Tensor, constant: int) -> Tensor:
    """``(x * constant) mod 2**32`` for ``x`` in ``[0, 2**32)``, without int64 overflow."""
    lo, hi = constant & 0xFFFF, constant >> 16
    return ((x * lo) + (((x * hi) & 0xFFFF) << 16)) & _MASK32


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit avalanche hash (lowbias32)."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _hash_keys(*keys: Tensor | int) -> Tensor:
    """Fold several integer keys (broadcastable tensors or ints) into one 32-bit hash."""
    h: Tensor | None = None
    for key in keys:
        k = key if isinstance(key, Tensor) else torch.tensor(key, dtype=torch.int64)
        k = k.to(torch.int64) & _MASK32
        h = _mix32(k if h is None else (_mix32(h + 0x9E3779B9) ^ k))
    assert h is not None
    return h


def uniform_transforms(
    box: TransformBox,
    seed: int,
    stream: int,
    image_ids: Tensor,
    n_draws: int,
    slot: Tensor | int = 0,
) -> Tensor:
    """Reproducible uniform draws from ``box``: ``(N, n_draws, 3)`` float32 on image_ids' device.

    Draw ``j`` for image ``image_ids[i]`` depends only on ``(seed, stream, image_ids[i], slot,
    j)``; ``slot`` may be a tensor of shape ``(N,)`` (the grid point, for the vote under
    attack). Each coordinate is uniform on its interval with 24-bit resolution.
    """
    device = image_ids.device
    ids = image_ids.to(torch.int64).view(-1, 1, 1)
    slots = slot.to(device, torch.int64).view(-1, 1, 1) if isinstance(slot, Tensor) else slot
    draw = torch.arange(n_draws, device=device, dtype=torch.int64).view(1, -1, 1)
    axis = torch.arange(3, device=device, dtype=torch.int64).view(1, 1, -1)
    h = _hash_keys(seed, stream, ids, slots, draw, axis)
    unit = (h >> 8).to(torch.float64) / float(1 << 24)
    return box.scale(unit)
