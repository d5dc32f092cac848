"""The public pages: server-rendered HTML (Jinja2, autoescaped) over the same service functions
as the JSON API.

- ``/``: the benchmarks with their top entries, the threat model and the metrics explained.
- ``/leaderboard/{benchmark}``: the ranked table; sort, filters, search and page are query
  parameters (links and the back button work without JavaScript), with links to the JSON and
  CSV of exactly the rows shown.
- ``/submissions/{id}``: live progress while queued or running (a small script polls the JSON
  API; without JavaScript the page refreshes itself), then the metrics, the plots, example
  images and the reproducibility record; the message of a failed run.
- ``/submissions/{id}/{landscape,rotation,fool-histogram}.svg``: the plots (`api.plots`),
  cached per evaluation; ``/submissions/{id}/examples/NN_{original,transformed}.png``: the
  example images the worker stored.

The pages are anonymous: a private submission is a 404 here for everyone (its owner follows
it through the API with a token), and the leaderboard shows only public, finished runs. Every
page and asset comes from this server, so it works offline.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import jinja2
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException

from api import plots
from api.deps import SessionDep, SettingsDep, StorageDep, base_url
from api.errors import DatabaseUnavailable, NotFound
from api.schemas import LeaderboardPage, SortKey, SortOrder, as_utc
from api.services.ablations import evaluation_ablations
from api.services.benchmarks import benchmark_public, get_benchmark, list_benchmarks
from api.services.leaderboard import (
    MAX_PER_PAGE,
    BoardCache,
    best_values,
    board_version,
    default_order,
    leaderboard,
)
from api.services.submissions import get_submission, status_url
from db.models import Evaluation, Submission, SubmissionStatus
from evaluator.benchmarks import BenchmarkSpec
from evaluator.errors import UnknownBenchmarkError
from evaluator.train import TrainingMethod
from spatialbench.settings import Settings
from storage import ObjectNotFoundError, example_key

__all__ = ["BoardQuery", "PageNotFound", "install_pages", "router"]

HERE = Path(__file__).resolve().parent
TEMPLATES_DIR = HERE / "templates"
STATIC_DIR = HERE / "static"

DEFAULT_PER_PAGE = 50
# The home page's preview of each leaderboard.
TOP_ENTRIES = 5
# How often the progress script asks the API, and the no-JavaScript page refresh.
POLL_INTERVAL_S = 3
REFRESH_S = 10

# Only what HTML pages need: our own styles and script, images from here (the plots embed a
# PNG as a data: URL), the API for polling. No inline script or style anywhere.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
HTML_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}

router = APIRouter(include_in_schema=False)
log = logging.getLogger(__name__)


# --- What the metrics mean (written once, used by every page) ---------------------------------


@dataclass(frozen=True)
class MetricInfo:
    key: SortKey
    label: str
    short: str
    explanation: str


METRICS: tuple[MetricInfo, ...] = (
    MetricInfo(
        SortKey.NATURAL, "Natural", "natural",
        "Accuracy on the untransformed test images.",
    ),
    MetricInfo(
        SortKey.RANDOM, "Random", "random",
        "Accuracy when each image is rotated and translated by one transformation drawn "
        "uniformly from the box.",
    ),
    MetricInfo(
        SortKey.WORST_OF_K, "Worst-of-10", "worst-of-10",
        "An image counts only if it is classified correctly under all 10 independent uniform "
        "draws: a cheap random-search attack.",
    ),
    MetricInfo(
        SortKey.GRID, "Grid", "grid",
        "The headline number. An image counts only if it is classified correctly at every "
        "one of the 775 grid points: the exhaustive attack.",
    ),
    MetricInfo(
        SortKey.FIRST_ORDER, "First-order", "first-order",
        "Projected gradient ascent on the cross-entropy over (θ, dx, dy) through the "
        "differentiable resampling, inside the same box. Optional: empty where not measured "
        "or where the model cannot be differentiated. Above grid means the gradient attack "
        "missed worst cases the grid found.",
    ),
    MetricInfo(
        SortKey.VOTE_NATURAL, "Vote", "vote",
        "The majority-vote defense: the model's majority label over 10 random transformations "
        "of its input. Accuracy of the defended model on untransformed images.",
    ),
    MetricInfo(
        SortKey.GRID_VOTE, "Grid + vote (adaptive)", "grid + vote (adaptive)",
        "The defended model under the adaptive attacker: the vote's 10 transformations for an "
        "image are drawn once and reused, and the attacker searches all 775 grid points "
        "against that fixed defended classifier; an image counts if the vote is right at "
        "every point.",
    ),
)  # fmt: skip
METRIC_KEYS = tuple(m.key.value for m in METRICS)

TRAINING_LABELS = {
    TrainingMethod.STANDARD: "standard",
    TrainingMethod.AUGMENTATION: "augmentation",
    TrainingMethod.WORST_OF_K: "worst-of-k",
    TrainingMethod.OTHER: "other",
}

# The paper's headline numbers (Engstrom et al., ICML 2019), as DESIGN.md quotes them: shown on
# the home page as the paper's, never mixed with results measured here.
PAPER_RESULTS = (
    ("CIFAR-10", "standard training", "93%", "3%"),
    ("CIFAR-10", "worst-of-10 training", "", "71%"),
    ("CIFAR-10", "worst-of-10 training + vote", "", "82%"),
    ("ImageNet", "standard training", "76%", "31%"),
    ("ImageNet", "worst-of-10 training", "", "53%"),
    ("ImageNet", "worst-of-10 training + vote", "", "56%"),
)
PAPER_URL = "https://arxiv.org/abs/1712.02779"


# --- Formatting (template filters) ------------------------------------------------------------


def pct(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value * 100:.{digits}f}%"


def number(value: float | int | None) -> str:
    if value is None:
        return "—"
    return f"{value:,}" if isinstance(value, int) else f"{value:,.2f}"


def grid_value(value: float) -> str:
    return f"{value:g}"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes = round(seconds / 60)
    if minutes < 60:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def date(value: datetime | None) -> str:
    value = as_utc(value)
    return "—" if value is None else value.strftime("%Y-%m-%d")


def timestamp(value: datetime | None) -> str:
    value = as_utc(value)
    return "—" if value is None else value.strftime("%Y-%m-%d %H:%M UTC")


def iso(value: datetime | None) -> str:
    value = as_utc(value)
    return "" if value is None else value.isoformat()


@functools.cache
def static_url(name: str) -> str:
    """``/static/NAME?v=HASH``: a new URL whenever the file changes, so it can be cached."""
    digest = hashlib.sha256((STATIC_DIR / name).read_bytes()).hexdigest()[:10]
    return f"/static/{name}?v={digest}"


@functools.cache
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES_DIR),
        # Everything is escaped, whatever the template's name: user text (model names,
        # descriptions, failure messages) only ever reaches the page as text.
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        pct=pct, number=number, duration=duration, date=date, timestamp=timestamp, iso=iso,
        grid_value=grid_value,
    )  # fmt: skip
    env.globals.update(
        static_url=static_url, METRICS=METRICS, TRAINING_LABELS=TRAINING_LABELS,
        PAPER_URL=PAPER_URL, sortkeys=SortKey,
    )  # fmt: skip
    return env


def render(
    request: Request, template: str, context: Mapping[str, Any], status_code: int = 200
) -> HTMLResponse:
    settings: Settings = request.app.state.settings
    values = {"nav_benchmarks": list_benchmarks(settings), "current": None, **context}
    html = _environment().get_template(template).render(values)
    return HTMLResponse(html, status_code=status_code, headers=HTML_HEADERS)


# --- Not found ----------------------------------------------------------------------------------


class PageNotFound(Exception):
    """An unknown benchmark or submission (or a private one): the HTML 404 page."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def not_found_page(request: Request, message: str) -> HTMLResponse:
    return render(request, "404.html", {"message": message}, status_code=404)


def unavailable_page(request: Request) -> HTMLResponse:
    error = DatabaseUnavailable()
    response = render(request, "503.html", {"message": error.detail}, status_code=503)
    response.headers.update(error.headers)
    return response


def _wants_html(request: Request) -> bool:
    return not request.url.path.startswith("/api/") and "text/html" in request.headers.get(
        "accept", ""
    )


def install_pages(app: FastAPI) -> None:
    """Add the pages, their static files and the HTML 404 and 503 pages to ``app`` (after the
    API's error handlers are installed: a browser asking for an unknown page outside ``/api``
    gets the HTML 404 page, a page whose database is down the HTML 503 page, everything else
    keeps the API's JSON errors)."""
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.state.plot_cache = plots.PlotCache()

    async def page_not_found(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, PageNotFound)
        return not_found_page(request, exc.message)

    json_http_error = app.exception_handlers.get(StarletteHTTPException)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code == 404 and _wants_html(request):
            return not_found_page(request, "There is no page at this address.")
        if json_http_error is None:
            raise exc
        response = json_http_error(request, exc)
        return await response if inspect.isawaitable(response) else response

    app.add_exception_handler(PageNotFound, page_not_found)
    app.add_exception_handler(StarletteHTTPException, http_error)

    # A page whose database is down answers an HTML 503 (the API keeps its JSON one).
    json_database_error = app.exception_handlers[DBAPIError]
    page_endpoints = {route.endpoint for route in router.routes}  # type: ignore[attr-defined]

    async def database_error(request: Request, exc: Exception) -> Response:
        answer = json_database_error(request, exc)
        response = await answer if inspect.isawaitable(answer) else answer
        if response.status_code == 503 and request.scope.get("endpoint") in page_endpoints:
            return unavailable_page(request)
        return response

    app.add_exception_handler(DBAPIError, database_error)
    app.add_exception_handler(PoolTimeoutError, database_error)


def _benchmark(name: str, settings: Settings) -> BenchmarkSpec:
    try:
        return get_benchmark(name, settings)
    except UnknownBenchmarkError:
        raise PageNotFound(f"There is no benchmark called “{name}”.") from None


def _submission(session: SessionDep, submission_id: str) -> Submission:
    # Pages are anonymous: a private submission is not found, even for its owner.
    try:
        return get_submission(session, submission_id, None)
    except NotFound:
        raise PageNotFound(
            f"There is no public submission with the id “{submission_id}”."
        ) from None


# --- The home page ------------------------------------------------------------------------------


@router.get("/", response_class=HTMLResponse)
def home(request: Request, session: SessionDep, settings: SettingsDep) -> HTMLResponse:
    boards = [
        (spec, leaderboard(session, spec.name, per_page=TOP_ENTRIES))
        for spec in list_benchmarks(settings)
    ]
    # Benchmarks with results first; otherwise in the server's order.
    boards.sort(key=lambda pair: pair[1].total == 0)
    return render(request, "index.html", {"boards": boards, "paper_results": PAPER_RESULTS})


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

    def sort_link(self, path: str, key: SortKey) -> str:
        """The header link for ``key``: its natural order first, the other order when the
        table is already sorted by it; back to the first page either way."""
        order = default_order(key)
        if key is self.sort:
            order = SortOrder.ASC if self.effective_order is SortOrder.DESC else SortOrder.DESC
        return self.url(path, sort=key, order=order, page=1)

    def aria_sort(self, key: SortKey) -> str | None:
        if key is not self.sort:
            return None
        return "ascending" if self.effective_order is SortOrder.ASC else "descending"

    @property
    def description(self) -> str:
        """How the table is sorted, in words ("grid, best first")."""
        order = self.effective_order
        if self.sort is SortKey.NAME:
            return "name, " + ("A to Z" if order is SortOrder.ASC else "Z to A")
        if self.sort is SortKey.CREATED_AT:
            return "date, " + ("newest first" if order is SortOrder.DESC else "oldest first")
        label = next(m.label for m in METRICS if m.key is self.sort)
        return f"{label.lower()}, " + ("best first" if order is SortOrder.DESC else "worst first")

    @property
    def filtered(self) -> bool:
        return bool(self.training_method or self.architecture or self.search)


def _best_values(
    session: SessionDep, benchmark: str, query: BoardQuery, board: LeaderboardPage
) -> dict[str, float]:
    """The best (highest) value of each metric over every row that matches the filters, not
    only this page's: the top row when the same filtered board is sorted by that metric."""
    if board.total < 2:
        return {}
    if board.total <= len(board.rows):
        best: dict[str, float] = {}
        for key in METRIC_KEYS:
            values = [getattr(r, key) for r in board.rows if getattr(r, key) is not None]
            if values:
                best[key] = max(values)
        return best
    found = best_values(
        session, benchmark, training_method=query.training_method,
        architecture=query.architecture, search=query.search,
    )  # fmt: skip
    return {key.value: value for key, value in found.items() if key.value in METRIC_KEYS}


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
    spec = _benchmark(benchmark, settings)
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
    path = f"/leaderboard/{spec.name}"
    api_path = f"/api/v1/leaderboard/{spec.name}"
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
            "sort_description": query.description,
            "board": board,
            "path": path,
            "best": _best_values(session, spec.name, query, board),
            "json_url": query.url(api_path, full=True),
            "csv_url": query.url(api_path, full=True) + "&format=csv",
            "architectures": architectures,
            "training_methods": list(TrainingMethod),
            "first": (board.page - 1) * board.per_page + 1,
            "last": (board.page - 1) * board.per_page + len(board.rows),
        },
    )


# --- A submission ---------------------------------------------------------------------------

_EXAMPLE_NAME = re.compile(r"^[0-9]{2}_(original|transformed)$")


def _finished_evaluation(submission: Submission) -> Evaluation | None:
    # As in the API: results are shown once the submission has finished.
    if submission.status is SubmissionStatus.FINISHED:
        return submission.evaluation
    return None


def _example_url(submission: Submission, stored: Any) -> str | None:
    """The page's URL of an example image the worker stored as ``examples/<id>/NAME.png``."""
    if not isinstance(stored, str):
        return None
    prefix = f"examples/{submission.id}/"
    if not stored.startswith(prefix) or not stored.endswith(".png"):
        return None
    name = stored[len(prefix) : -len(".png")]
    if not _EXAMPLE_NAME.match(name):
        return None
    return f"/submissions/{submission.id}/examples/{name}.png"


def _examples(submission: Submission, evaluation: Evaluation) -> list[dict[str, Any]]:
    out = []
    for example in evaluation.examples or []:
        if not isinstance(example, dict):
            continue
        original = _example_url(submission, example.get("original"))
        transformed = _example_url(submission, example.get("transformed"))
        if original is None or transformed is None:
            continue
        given = example.get("point")
        point: dict[str, Any] = given if isinstance(given, dict) else {}

        def label(value: Any, name: Any = None) -> str:
            return name if isinstance(name, str) and name else str(value)

        true_label, pred = example.get("label"), example.get("pred")
        out.append(
            {
                "index": example.get("index"),
                "fooled": bool(example.get("fooled", True)),
                "label": label(true_label, example.get("label_name")),
                # The worker names the true and the fooled class; the natural prediction has a
                # name when it is the true class.
                "pred": label(pred, example.get("label_name") if pred == true_label else None),
                "fool_pred": label(example.get("fool_pred"), example.get("fool_pred_name")),
                "theta": float(point.get("theta", 0.0)),
                "dx": float(point.get("dx", 0.0)),
                "dy": float(point.get("dy", 0.0)),
                "original": original,
                "transformed": transformed,
            }
        )  # fmt: skip
    return out


def _metric_rows(evaluation: Evaluation) -> list[dict[str, Any]]:
    details = evaluation.metrics or {}
    rows = []
    for info in METRICS:
        detail = details.get(info.key.value) if isinstance(details, dict) else None
        detail = detail if isinstance(detail, dict) else {}
        rows.append(
            {
                "info": info,
                "value": getattr(evaluation, info.key.value),
                "correct": detail.get("correct"),
                "total": detail.get("total"),
                # Why there is no number (first-order on a model without gradients).
                "error": detail.get("error"),
                "gap": _fraction(detail.get("gap_to_grid")),
                "protocol": detail.get("protocol"),
            }
        )
    return rows


# The vote's attacker models in display order: (result key, name); the one-sentence
# description shown with each comes from the result, and this one when an older result has none.
VOTE_PROTOCOLS = (
    ("grid_vote", "adaptive",
     "The vote's 10 transformations for an image are drawn once and reused; the attacker "
     "searches all grid points against that fixed defended classifier."),
    ("grid_vote_per_query", "per-query",
     "Fresh vote draws at every grid point: an attacker who may query again until the dice "
     "fall its way."),
    ("grid_vote_transfer", "transfer",
     "The attacker picks the undefended model's worst grid point (misclassified first, then "
     "highest cross-entropy) and the vote decides there once."),
)  # fmt: skip


def _fraction(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _vote_rows(evaluation: Evaluation) -> list[dict[str, Any]]:
    """Grid + vote under each attacker model the result has, with the images behind it and
    the grid's accuracy on those same images."""
    details = evaluation.metrics if isinstance(evaluation.metrics, dict) else {}
    rows = []
    for key, name, attacker in VOTE_PROTOCOLS:
        detail = details.get(key)
        # A result from before the attacker models were named has a grid_vote without a
        # protocol (it was per-query): it is not shown as any of them.
        if not isinstance(detail, dict) or "protocol" not in detail:
            continue
        rows.append(
            {
                "protocol": str(detail.get("protocol") or name),
                "attacker": str(detail.get("attacker") or attacker),
                "accuracy": _fraction(detail.get("accuracy")),
                "correct": detail.get("correct"),
                "images": detail.get("images", detail.get("total")),
                "grid_same_images": _fraction(detail.get("grid_same_images")),
            }
        )
    return rows


def _ablation_rows(evaluation: Evaluation) -> list[dict[str, Any]]:
    rows = []
    for name, record in evaluation_ablations(evaluation).items():
        if not isinstance(record, dict):
            continue
        grid = record.get("grid")
        grid = grid if isinstance(grid, list) else []
        rows.append(
            {
                "name": str(name),
                "label": str(record.get("label") or name),
                "grid": " × ".join(str(n) for n in grid),
                "grid_points": record.get("grid_points"),
                "fill": str(record.get("fill") or "—"),
                "canvas": record.get("canvas") or 1,
                "images": record.get("images"),
                "accuracy": _fraction(record.get("accuracy")),
                "natural": _fraction(record.get("natural")),
                "error": record.get("error"),
            }
        )
    return rows


def _has_landscape(evaluation: Evaluation) -> bool:
    try:
        plots._landscape_array(evaluation.landscape)
    except plots.PlotUnavailable:
        return False
    return True


def _has_fool_counts(evaluation: Evaluation) -> bool:
    try:
        plots.fool_counts(evaluation.per_image)
    except plots.PlotUnavailable:
        return False
    return True


@router.get("/submissions/{submission_id}", response_class=HTMLResponse)
def submission_page(
    request: Request, submission_id: str, session: SessionDep, settings: SettingsDep
) -> HTMLResponse:
    submission = _submission(session, submission_id)
    try:
        spec: BenchmarkSpec | None = get_benchmark(submission.benchmark, settings)
    except UnknownBenchmarkError:  # a benchmark the operator has since removed
        spec = None
    evaluation = _finished_evaluation(submission)
    active = submission.status in (SubmissionStatus.QUEUED, SubmissionStatus.RUNNING)
    context: dict[str, Any] = {
        "current": submission.benchmark,
        "s": submission,
        "spec": spec,
        "active": active,
        "evaluation": evaluation,
        "poll_url": status_url(submission.id),
        "poll_interval_ms": POLL_INTERVAL_S * 1000,
        "refresh_s": REFRESH_S,
        "curl": f"curl -s {base_url(request)}{status_url(submission.id)}",
    }
    if evaluation is None:
        return render(request, "submission.html", context)
    try:
        return render(request, "submission.html", _result_context(submission, evaluation, context))
    except _MALFORMED as exc:
        # A stored result this page cannot show: say so rather than answer 500.
        log.warning("the stored result of %s cannot be shown: %r", submission.id, exc)
        context.update(evaluation=None, result_error=RESULT_ERROR)
        return render(request, "submission.html", context)


# What a malformed stored result raises while the page is built or rendered.
_MALFORMED = (TypeError, ValueError, AttributeError, KeyError, OverflowError, jinja2.TemplateError)
RESULT_ERROR = (
    "This submission's stored result is malformed and cannot be shown. The operator has been "
    "told; evaluating the model again will replace it."
)


def _result_context(
    submission: Submission, evaluation: Evaluation, context: dict[str, Any]
) -> dict[str, Any]:
    context = dict(context)
    config = evaluation.config or {}
    cost = evaluation.cost or {}
    context.update(
        metrics=_metric_rows(evaluation),
        votes=_vote_rows(evaluation),
        ablations=_ablation_rows(evaluation),
        has_landscape=_has_landscape(evaluation),
        has_histogram=_has_fool_counts(evaluation),
        examples=_examples(submission, evaluation),
        config=config,
        cost=cost,
        landscape_images=(evaluation.landscape or {}).get("images"),
        grid_shape=(evaluation.landscape or {}).get("shape") or config.get("grid") or [],
        by_phase={
            k: v for k, v in (cost.get("forward_passes_by_phase") or {}).items() if k != "total"
        },
    )
    return context


def _plot(
    request: Request, session: SessionDep, submission_id: str, kind: str, draw: Any
) -> Response:
    submission = _submission(session, submission_id)
    evaluation = _finished_evaluation(submission)
    if evaluation is None:
        raise PageNotFound("This submission has no results yet.")
    # The submission id is a UUID, unique across databases; the evaluation's id and time tell
    # a re-evaluation apart.
    key = (kind, submission.id, evaluation.id, iso(evaluation.created_at))
    etag = '"' + hashlib.sha256(repr(key).encode()).hexdigest()[:24] + '"'
    headers = {"ETag": etag, "Cache-Control": "public, max-age=3600"}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    cache: plots.PlotCache = request.app.state.plot_cache
    try:
        svg = cache.get(key, lambda: draw(evaluation))
    except plots.PlotUnavailable as exc:
        raise PageNotFound(f"This plot is not available: {exc}.") from None
    except _MALFORMED:
        raise PageNotFound("This plot is not available: the stored result is malformed.") from None
    return Response(svg, media_type="image/svg+xml", headers=headers)


@router.get("/submissions/{submission_id}/landscape.svg")
def landscape_plot(request: Request, submission_id: str, session: SessionDep) -> Response:
    return _plot(request, session, submission_id, "landscape",
                 lambda ev: plots.landscape_svg(ev.landscape))  # fmt: skip


@router.get("/submissions/{submission_id}/rotation.svg")
def rotation_plot(request: Request, submission_id: str, session: SessionDep) -> Response:
    return _plot(request, session, submission_id, "rotation",
                 lambda ev: plots.rotation_svg(ev.landscape))  # fmt: skip


@router.get("/submissions/{submission_id}/fool-histogram.svg")
def fool_histogram_plot(request: Request, submission_id: str, session: SessionDep) -> Response:
    def draw(ev: Evaluation) -> bytes:
        shape = (ev.landscape or {}).get("shape") or (ev.config or {}).get("grid") or [31, 5, 5]
        points = 1
        for n in shape:
            points *= int(n)
        return plots.fool_histogram_svg(ev.per_image, points)

    return _plot(request, session, submission_id, "fool-histogram", draw)


@router.get("/submissions/{submission_id}/examples/{name}.png")
def example_image(
    submission_id: str, name: str, session: SessionDep, storage: StorageDep
) -> Response:
    """An example image, only by a name this evaluation lists (nothing else in storage is
    reachable: the name is checked against a strict pattern and against the record),
    streamed from the storage the worker put it in."""
    if not _EXAMPLE_NAME.match(name):
        raise PageNotFound("There is no such example image.")
    submission = _submission(session, submission_id)
    evaluation = _finished_evaluation(submission)
    key = example_key(submission.id, name)
    listed = evaluation is not None and any(
        isinstance(e, dict) and key in (e.get("original"), e.get("transformed"))
        for e in evaluation.examples or []
    )
    if not listed:
        raise PageNotFound("There is no such example image.")
    try:
        chunks = storage.stream(key)
    except ObjectNotFoundError:
        raise PageNotFound("There is no such example image.") from None
    return StreamingResponse(
        chunks, media_type="image/png", headers={"Cache-Control": "public, max-age=3600"}
    )
