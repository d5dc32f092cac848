"""The home page and the leaderboard pages: the ranked table, whose sort, filters, search and
page are query parameters (links and the back button work without JavaScript), with links to
the JSON and CSV of exactly the rows shown."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response

from api.deps import SessionDep, SettingsDep
from api.pages.rendering import (
    HTML_HEADERS,
    PAPER_RESULTS,
    board_metrics,
    find_benchmark,
    render,
    shared_counts,
)
from api.schemas import LeaderboardPage, SortKey, SortOrder
from api.services.benchmarks import benchmark_public, list_benchmarks
from api.services.leaderboard import (
    MAX_PER_PAGE,
    BoardCache,
    best_values_for_board,
    board_version,
    default_order,
    leaderboard,
)
from api.urls import api_path
from evaluator.benchmarks import BenchmarkSpec
from evaluator.vocabulary import (
    VOTE_ATTACKER_KEYS,
    BenchmarkCounts,
    MetricText,
    TrainingMethod,
    metric_texts,
)

__all__ = ["BoardQuery", "router"]

DEFAULT_PER_PAGE = 50
# The home page's preview of each leaderboard.
TOP_ENTRIES = 5

router = APIRouter(include_in_schema=False)


@router.get("/", response_class=HTMLResponse)
def home(request: Request, session: SessionDep, settings: SettingsDep) -> HTMLResponse:
    specs = list_benchmarks(settings)
    boards = [
        (spec, grid_summary(spec), leaderboard(session, spec.name, per_page=TOP_ENTRIES))
        for spec in specs
    ]
    # Benchmarks with results first; otherwise in the server's order.
    boards.sort(key=lambda entry: entry[2].total == 0)
    # The page's prose states a grid, k and vote samples only where every benchmark it
    # describes shares them; each benchmark's card states its own.
    counts = shared_counts(specs)
    grids = [grid for _, grid, _ in boards]
    return render(
        request,
        "index.html",
        {
            "boards": boards,
            "paper_results": PAPER_RESULTS,
            "metrics": board_metrics(counts),
            "attackers": vote_attackers(counts),
            "grid": grids[0] if all(grid == grids[0] for grid in grids) else None,
        },
    )


def grid_summary(spec: BenchmarkSpec) -> dict[str, Any]:
    """A benchmark's grid as the home page words it: its shape, size, rotation limit and
    angle step (the translations, in pixels, differ with the image size)."""
    thetas = [round(float(v), 4) for v in spec.grid.axes()[0]]
    return {
        "shape": spec.grid.shape,
        "points": spec.grid.size,
        "max_rotation": spec.grid.box.max_rotation,
        "theta_step": thetas[1] - thetas[0] if len(thetas) > 1 else 0.0,
    }


def vote_attackers(counts: BenchmarkCounts | None) -> list[tuple[str, MetricText]]:
    """Each attacker model of grid + vote by name, with its metric's text."""
    texts = metric_texts(counts)
    return [(name, texts[key]) for name, key in VOTE_ATTACKER_KEYS.items()]


# --- The leaderboard ---------------------------------------------------------------------------


@dataclass(frozen=True)
class BoardQuery:
    """What a leaderboard page shows: its query parameters, read leniently (a bad value falls
    back to the default rather than failing: these are links people edit and share)."""

    sort: SortKey = SortKey.GRID
    order: SortOrder | None = None
    training_method: TrainingMethod | None = None
    architecture: str | None = None
    search: str | None = None
    page: int = 1
    per_page: int = DEFAULT_PER_PAGE

    @classmethod
    def parse(cls, params: Mapping[str, str]) -> BoardQuery:
        def enum(kind: Any, value: str | None) -> Any:
            try:
                return kind(value) if value else None
            except ValueError:
                return None

        def positive(value: str | None, default: int, top: int) -> int:
            try:
                return min(max(1, int(value or default)), top)
            except ValueError:
                return default

        text = (params.get("search") or "").strip()[:200] or None
        return cls(
            sort=enum(SortKey, params.get("sort")) or SortKey.GRID,
            order=enum(SortOrder, params.get("order")),
            training_method=enum(TrainingMethod, params.get("training_method")),
            architecture=(params.get("architecture") or "").strip()[:100] or None,
            search=text,
            page=positive(params.get("page"), 1, 10**6),
            per_page=positive(params.get("per_page"), DEFAULT_PER_PAGE, MAX_PER_PAGE),
        )

    @property
    def effective_order(self) -> SortOrder:
        return self.order or default_order(self.sort)

    def params(self, *, full: bool = False, **changes: Any) -> dict[str, str]:
        """The query parameters of this view with ``changes``; defaults left out unless
        ``full`` (the API's defaults differ from the page's, so its links spell them out)."""
        q = replace(self, **changes)
        out: dict[str, str] = {}
        if full or q.sort is not SortKey.GRID:
            out["sort"] = q.sort.value
        if full or (q.order is not None and q.order is not default_order(q.sort)):
            out["order"] = q.effective_order.value
        if q.training_method is not None:
            out["training_method"] = q.training_method.value
        if q.architecture:
            out["architecture"] = q.architecture
        if q.search:
            out["search"] = q.search
        if full or q.page != 1:
            out["page"] = str(q.page)
        if full or q.per_page != DEFAULT_PER_PAGE:
            out["per_page"] = str(q.per_page)
        return out

    def url(self, path: str, *, full: bool = False, **changes: Any) -> str:
        params = self.params(full=full, **changes)
        return f"{path}?{urlencode(params)}" if params else path

    def sort_link(self, path: str, key: str) -> str:
        """The header link for ``key`` (a `SortKey`, or the `MetricKey` of a column): its
        natural order first, the other order when the table is already sorted by it; back to
        the first page either way."""
        sort = SortKey(key)
        order = default_order(sort)
        if sort is self.sort:
            order = SortOrder.ASC if self.effective_order is SortOrder.DESC else SortOrder.DESC
        return self.url(path, sort=sort, order=order, page=1)

    def aria_sort(self, key: str) -> str | None:
        if SortKey(key) is not self.sort:
            return None
        return "ascending" if self.effective_order is SortOrder.ASC else "descending"

    def description(self, metrics: Sequence[MetricText]) -> str:
        """How the table is sorted, in words ("grid, best first"), naming the metric as
        ``metrics`` (the board's columns) do."""
        order = self.effective_order
        if self.sort is SortKey.NAME:
            return "name, " + ("A to Z" if order is SortOrder.ASC else "Z to A")
        if self.sort is SortKey.CREATED_AT:
            return "date, " + ("newest first" if order is SortOrder.DESC else "oldest first")
        short = next(m.short for m in metrics if SortKey(m.key) is self.sort)
        return f"{short}, " + ("best first" if order is SortOrder.DESC else "worst first")

    @property
    def filtered(self) -> bool:
        return bool(self.training_method or self.architecture or self.search)


def _best_values(
    session: SessionDep,
    benchmark: str,
    query: BoardQuery,
    board: LeaderboardPage,
    metrics: Sequence[MetricText],
) -> dict[str, float]:
    """The best value of each shown metric over every row that matches the filters."""
    keys = [m.key.value for m in metrics]
    return best_values_for_board(
        session, benchmark, board, keys, training_method=query.training_method,
        architecture=query.architecture, search=query.search,
    )  # fmt: skip


def protocol(spec: BenchmarkSpec) -> dict[str, Any]:
    """The benchmark's protocol, as the page states it above the table."""
    d = spec.to_dict()
    height, width = spec.image_size
    dx, dy = d["max_translation"]
    thetas, dxs, dys = ([round(float(v), 4) for v in axis] for axis in spec.grid.axes())
    return {
        **d,
        "translation_pct": 100 * max(dx / width, dy / height),
        "thetas": thetas,
        "theta_step": thetas[1] - thetas[0] if len(thetas) > 1 else 0.0,
        "dxs": dxs,
        "dys": dys,
    }


@router.get("/leaderboard/{benchmark}", response_class=HTMLResponse)
def leaderboard_page(
    request: Request, benchmark: str, session: SessionDep, settings: SettingsDep
) -> Response:
    spec = find_benchmark(benchmark, settings)
    query = BoardQuery.parse(request.query_params)
    # The rendering is reused while the board is unchanged: a popular board is polled far
    # more often than it changes, and rendering it is most of a request's cost.
    key = ("page", spec.name, query, board_version(session, spec.name))
    cache: BoardCache = request.app.state.board_cache
    headers = {**HTML_HEADERS, "ETag": cache.etag(key), "Cache-Control": "no-cache"}
    if request.headers.get("if-none-match") == headers["ETag"]:
        return Response(status_code=304, headers=headers)
    body = cache.get(key, lambda: bytes(_render_leaderboard(request, session, spec, query).body))
    return HTMLResponse(body, headers=headers)


def _render_leaderboard(
    request: Request, session: SessionDep, spec: BenchmarkSpec, query: BoardQuery
) -> HTMLResponse:
    board = leaderboard(
        session,
        spec.name,
        sort=query.sort,
        order=query.effective_order,
        training_method=query.training_method,
        architecture=query.architecture,
        search=query.search,
        page=query.page,
        per_page=query.per_page,
    )
    metrics = board_metrics(spec.counts)
    path = f"/leaderboard/{spec.name}"
    board_api_path = api_path(f"/leaderboard/{spec.name}")
    architectures = sorted(
        set(benchmark_public(spec).architectures)
        | ({query.architecture} if query.architecture else set())
    )
    return render(
        request,
        "leaderboard.html",
        {
            "current": spec.name,
            "spec": spec,
            "protocol": protocol(spec),
            "query": query,
            "metrics": metrics,
            "sort_description": query.description(metrics),
            "board": board,
            "path": path,
            "best": _best_values(session, spec.name, query, board, metrics),
            "json_url": query.url(board_api_path, full=True),
            "csv_url": query.url(board_api_path, full=True) + "&format=csv",
            "architectures": architectures,
            "training_methods": list(TrainingMethod),
            "first": (board.page - 1) * board.per_page + 1,
            "last": (board.page - 1) * board.per_page + len(board.rows),
        },
    )
