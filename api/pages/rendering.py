"""What every page shares: the Jinja2 environment (autoescaped) and its filters, the metric
texts worded for the benchmark a page shows, the paper's numbers, the HTML 404 and 503 pages,
and the look-ups that turn an unknown benchmark or submission into the 404 page."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from fastapi import Request
from fastapi.responses import HTMLResponse

from api.deps import SessionDep
from api.errors import DatabaseUnavailable, NotFound
from api.schemas import SortKey
from api.services.benchmarks import get_benchmark, list_benchmarks
from api.services.submissions import get_submission
from config.settings import Settings
from db.models import Submission
from evaluator.benchmarks import BenchmarkSpec
from evaluator.errors import UnknownBenchmarkError
from evaluator.vocabulary import (
    BOARD_METRICS,
    BenchmarkCounts,
    MetricText,
    TrainingMethod,
    metric_texts,
)

__all__ = [
    "HTML_HEADERS",
    "PageNotFound",
    "board_metrics",
    "find_benchmark",
    "find_submission",
    "not_found_page",
    "render",
    "shared_counts",
    "unavailable_page",
]

HERE = Path(__file__).resolve().parent.parent
TEMPLATES_DIR = HERE / "templates"
STATIC_DIR = HERE / "static"


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


# --- What the metrics mean (worded by `evaluator.vocabulary`, for the benchmark shown) -----------


def shared_counts(specs: Iterable[BenchmarkSpec]) -> BenchmarkCounts | None:
    """The counts every one of ``specs`` has, or None when they differ (a page about several
    benchmarks then words the metrics without numbers)."""
    found = {spec.counts for spec in specs}
    return found.pop() if len(found) == 1 else None


def board_metrics(counts: BenchmarkCounts | None) -> list[MetricText]:
    """The leaderboard's metric columns, in its order, worded for ``counts``."""
    texts = metric_texts(counts)
    return [texts[key] for key in BOARD_METRICS]


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
    return "—" if value is None else value.strftime("%Y-%m-%d")


def timestamp(value: datetime | None) -> str:
    return "—" if value is None else value.strftime("%Y-%m-%d %H:%M UTC")


def iso(value: datetime | None) -> str:
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
        static_url=static_url, TRAINING_LABELS=TRAINING_LABELS,
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


def find_benchmark(name: str, settings: Settings) -> BenchmarkSpec:
    try:
        return get_benchmark(name, settings)
    except UnknownBenchmarkError:
        raise PageNotFound(f"There is no benchmark called “{name}”.") from None


def find_submission(session: SessionDep, submission_id: str) -> Submission:
    # Pages are anonymous: a private submission is not found, even for its owner.
    try:
        return get_submission(session, submission_id, None)
    except NotFound:
        raise PageNotFound(
            f"There is no public submission with the id “{submission_id}”."
        ) from None


# --- The home page ------------------------------------------------------------------------------
