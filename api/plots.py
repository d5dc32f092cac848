"""The model page's plots, rendered on the server as SVG with matplotlib.

Input is what the evaluator stored (``Evaluation.landscape`` and ``per_image``), never user
text, so nothing a submitter wrote ends up inside an SVG. Each function returns the SVG bytes;
`PlotCache` keeps the last few per evaluation so a page view does not re-render.

Matplotlib is imported on first use (it takes a moment), with the Agg backend chosen before
anything could import pyplot. Figures are built with the object API (``Figure``), not pyplot's
global state, so concurrent requests in the threadpool do not share a current figure; a lock
still serialises rendering, because matplotlib's font and text caches are not thread-safe.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from typing import Any

__all__ = [
    "PlotCache",
    "PlotUnavailable",
    "fool_counts",
    "fool_histogram_svg",
    "landscape_svg",
    "rotation_svg",
]

_render_lock = threading.Lock()
# What a plot draws at most, whatever is stored: rendering time stays bounded.
MAX_PANELS = 32
MAX_GRID_POINTS = 100_000
MAX_TICKS = 12

# Colours that stay apart for the common colour-vision deficiencies (Okabe-Ito).
_BLUE, _ORANGE, _GREEN, _GREY = "#0072B2", "#E69F00", "#009E73", "#777777"


class PlotUnavailable(ValueError):
    """The evaluation holds no data for this plot (metric off, or an older result)."""


def _matplotlib() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams.update(
        {
            # Text stays text: smaller files, the page's font, selectable labels.
            "svg.fonttype": "none",
            # Stable element ids, so the same data gives the same bytes.
            "svg.hashsalt": "spatialbench",
            "font.size": 10,
            "axes.spines.top": False,
            "axes.spines.right": False,
        }
    )
    return matplotlib


def _svg(fig: Any) -> bytes:
    out = io.BytesIO()
    # No date in the metadata: the same evaluation renders to the same bytes.
    fig.savefig(out, format="svg", metadata={"Date": None}, bbox_inches="tight", dpi=144)
    return out.getvalue()


def _landscape_array(landscape: dict[str, Any] | None) -> tuple[Any, list[float], list[float],
                                                                list[float]]:  # fmt: skip
    import numpy as np

    if not landscape or "accuracy" not in landscape:
        raise PlotUnavailable("this evaluation has no landscape")
    try:
        acc = np.asarray(landscape["accuracy"], dtype=float)
        thetas = [float(v) for v in landscape["thetas"]]
        dxs = [float(v) for v in landscape["dxs"]]
        dys = [float(v) for v in landscape["dys"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise PlotUnavailable(f"malformed landscape: {exc}") from None
    if acc.shape != (len(thetas), len(dxs), len(dys)) or acc.size == 0:
        raise PlotUnavailable(f"landscape of shape {acc.shape} does not match its axes")
    # One panel per dx and one cell per point: a stored grid far beyond any benchmark's would
    # take minutes to draw behind the render lock.
    if len(dxs) > MAX_PANELS or acc.size > MAX_GRID_POINTS:
        raise PlotUnavailable(f"a landscape of shape {acc.shape} is too large to draw")
    if not np.isfinite(acc).all():
        raise PlotUnavailable("the landscape holds values that are not numbers")
    return np.clip(acc, 0.0, 1.0), thetas, dxs, dys


def _angle_ticks(thetas: list[float]) -> list[float]:
    return [t for t in thetas if t % 10 == 0] or thetas[:: max(1, len(thetas) // 6)]


def _fmt(value: float) -> str:
    return f"{value:g}"


def landscape_svg(landscape: dict[str, Any] | None) -> bytes:
    """Accuracy at every grid point: one heatmap panel per ``dx``, rotation along x and ``dy``
    down each panel, a shared colour scale fixed at 0..100% so models compare at a glance."""
    acc, thetas, dxs, dys = _landscape_array(landscape)
    _matplotlib()
    from matplotlib.figure import Figure

    n_dx = len(dxs)
    with _render_lock:
        fig = Figure(figsize=(7.2, 1.0 + 1.05 * n_dx))
        axes = fig.subplots(n_dx, 1, sharex=True, squeeze=False)[:, 0]

        # Cell edges halfway between grid values, so each cell is centred on its point.
        def edges(values: Sequence[float]) -> list[float]:
            if len(values) == 1:
                return [values[0] - 0.5, values[0] + 0.5]
            mids = [(a + b) / 2 for a, b in zip(values, values[1:], strict=False)]
            return [2 * values[0] - mids[0], *mids, 2 * values[-1] - mids[-1]]

        image = None
        for ax, j in zip(axes, range(n_dx), strict=True):
            panel = acc[:, j, :].T * 100  # (dy, theta)
            image = ax.pcolormesh(
                edges(thetas), edges(dys), panel, cmap="viridis", vmin=0, vmax=100,
                shading="flat", rasterized=True,
            )  # fmt: skip
            ax.set_ylim(edges(dys)[-1], edges(dys)[0])  # dy positive = down, as displayed
            ax.set_yticks(dys[:: max(1, len(dys) // 3)] if len(dys) > 5 else dys)
            ax.set_yticklabels([_fmt(v) for v in ax.get_yticks()], fontsize=8)
            ax.set_ylabel(f"dx = {_fmt(dxs[j])}", rotation=0, ha="right", va="center")
            ax.tick_params(length=2)
            for side in ("left", "bottom"):
                ax.spines[side].set_visible(False)
            if dxs[j] == 0 and 0.0 in thetas and 0.0 in dys:
                ax.plot([0], [0], marker="o", markersize=4, markerfacecolor="none",
                        markeredgecolor="white", linestyle="none")  # fmt: skip
        axes[-1].set_xlabel("rotation θ (degrees)")
        axes[-1].set_xticks(_angle_ticks(thetas))
        assert image is not None  # there is at least one dx panel
        cbar = fig.colorbar(image, ax=list(axes), fraction=0.035, pad=0.02)
        cbar.set_label("accuracy (%)")
        cbar.outline.set_visible(False)
        images = (landscape or {}).get("images")
        title = "Accuracy at each grid point"
        if images:
            title += f" ({int(images):,} images)"
        fig.suptitle(title, x=0.02, ha="left", fontsize=11)
        axes[0].set_title(
            "one panel per horizontal shift dx, rows are vertical shifts dy (pixels); "
            "○ marks the untransformed image",
            fontsize=8, color=_GREY, loc="left",
        )  # fmt: skip
        return _svg(fig)


def rotation_svg(landscape: dict[str, Any] | None) -> bytes:
    """Accuracy against the rotation angle: without translation, averaged over the
    translations, and at the worst translation for each angle."""
    acc, thetas, dxs, dys = _landscape_array(landscape)
    _matplotlib()
    from matplotlib.figure import Figure
    from matplotlib.ticker import PercentFormatter

    flat = acc.reshape(len(thetas), -1) * 100
    with _render_lock:
        fig = Figure(figsize=(7.2, 3.4))
        ax = fig.subplots()
        if 0.0 in dxs and 0.0 in dys:
            centre = acc[:, dxs.index(0.0), dys.index(0.0)] * 100
            ax.plot(thetas, centre, color=_BLUE, linewidth=2, label="no translation")
        ax.plot(thetas, flat.mean(axis=1), color=_GREEN, linewidth=1.5, linestyle="--",
                label="mean over translations")  # fmt: skip
        ax.plot(thetas, flat.min(axis=1), color=_ORANGE, linewidth=1.5, linestyle=":",
                label="worst translation")  # fmt: skip
        ax.fill_between(thetas, flat.min(axis=1), flat.max(axis=1), color=_GREY, alpha=0.15,
                        linewidth=0, label="range over translations")  # fmt: skip
        ax.set_ylim(0, 100)
        ax.set_xlim(min(thetas), max(thetas))
        ax.yaxis.set_major_formatter(PercentFormatter(decimals=0))
        ax.set_xticks(_angle_ticks(thetas))
        ax.set_xlabel("rotation θ (degrees)")
        ax.set_ylabel("accuracy")
        ax.grid(True, axis="y", color="#dddddd", linewidth=0.6)
        ax.legend(loc="lower center", fontsize=8, frameon=False, ncols=2)
        return _svg(fig)


def fool_counts(per_image: dict[str, Any] | None) -> list[int]:
    """How many grid points fool each image of the landscape subset (-1 marks the others)."""
    if not per_image or "grid_fool_count" not in per_image:
        raise PlotUnavailable("this evaluation has no per-image fool counts")
    stored = per_image["grid_fool_count"]
    if not isinstance(stored, list):
        raise PlotUnavailable("malformed fool counts")
    try:
        counts = [int(c) for c in stored if int(c) >= 0]
    except (TypeError, ValueError, OverflowError) as exc:
        raise PlotUnavailable(f"malformed fool counts: {exc}") from None
    if not counts:
        raise PlotUnavailable("no image of this evaluation was searched exhaustively")
    return counts


def fool_histogram_svg(per_image: dict[str, Any] | None, grid_points: int) -> bytes:
    """A histogram of how many of the grid's ``grid_points`` (the evaluated benchmark's grid
    size) fool each image. Images no point fools (robust on the whole grid) get their own bar;
    the rest are binned."""
    counts = fool_counts(per_image)
    _matplotlib()
    import numpy as np
    from matplotlib.figure import Figure

    # The axis is the grid's, never the data's: a stored count beyond the grid (which no
    # evaluation produces) lands in the last bar instead of stretching the axis.
    top = min(max(int(grid_points), 1), MAX_GRID_POINTS)
    values = np.clip(np.asarray(counts, dtype=np.int64), 0, top)
    bins = 31 if top >= 31 else top
    width = top / bins
    edges = np.linspace(1, top + 1, bins + 1)
    fooled, _ = np.histogram(values[values > 0], bins=edges)
    robust = int((values == 0).sum())
    n = len(values)
    with _render_lock:
        fig = Figure(figsize=(7.2, 3.0))
        ax = fig.subplots()
        zero_x = -width * 0.9
        ax.bar([zero_x], [robust], width=width * 0.9, color=_GREEN, label="never fooled")
        ax.bar(edges[:-1], fooled, width=width * 0.9, align="edge", color=_BLUE,
               label="fooled by at least one point")  # fmt: skip
        step = 200 if top > 400 else 50 if top > 100 else 10
        step = max(step, -(-top // MAX_TICKS))
        ticks = [zero_x, 1, *range(step, top - step // 2, step), top]
        ax.set_xticks(ticks)
        ax.set_xticklabels(["0", *[str(int(t)) for t in ticks[1:]]])
        ax.set_xlim(zero_x - width, top + width)
        ax.set_xlabel(f"grid points (of {grid_points}) that fool the image")
        ax.set_ylabel("images")
        ax.grid(True, axis="y", color="#dddddd", linewidth=0.6)
        ax.set_axisbelow(True)
        ax.legend(loc="upper center", fontsize=8, frameon=False, ncols=2)
        ax.set_title(
            f"{robust:,} of {n:,} images ({robust / n:.0%}) survive every grid point",
            fontsize=10, loc="left",
        )  # fmt: skip
        return _svg(fig)


class PlotCache:
    """A small thread-safe LRU of rendered plots, keyed by what identifies an evaluation's data
    (the caller's key must change whenever the data could)."""

    def __init__(self, maxsize: int = 128) -> None:
        self.maxsize = maxsize
        self._items: OrderedDict[Hashable, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable, render: Callable[[], bytes]) -> bytes:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        data = render()  # outside the lock: rendering takes a while; a race renders twice
        with self._lock:
            self._items[key] = data
            self._items.move_to_end(key)
            while len(self._items) > self.maxsize:
                self._items.popitem(last=False)
        return data

    def __len__(self) -> int:
        return len(self._items)
