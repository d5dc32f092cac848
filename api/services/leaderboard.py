"""The leaderboard of a benchmark: public, finished, unflagged submissions with their metrics.

Rows are ranked by the sort key with ties sharing a rank (SQL ``RANK()``), over the filtered
set; missing values sort last whatever the order. The default is the paper's headline: grid
accuracy, best first.
"""

from __future__ import annotations

import csv
import hashlib
import io
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from typing import Any, TypeVarTuple

from sqlalchemy import ColumnElement, Select, case, func, or_, select
from sqlalchemy.orm import Session

from api.schemas import LeaderboardPage, LeaderboardRow, SortKey, SortOrder
from db.models import Evaluation, Submission, SubmissionStatus, User
from evaluator.vocabulary import BOARD_METRICS, TrainingMethod

__all__ = [
    "CSV_COLUMNS",
    "BoardCache",
    "best_values",
    "best_values_for_board",
    "board_version",
    "default_order",
    "leaderboard",
    "leaderboard_csv",
    "leaderboard_document",
]

MAX_PER_PAGE = 500

# Each metric column of the board is the evaluation's column of the same name.
METRIC_COLUMNS: dict[SortKey, Any] = {
    SortKey(key): getattr(Evaluation, key) for key in BOARD_METRICS
}
_SORT_COLUMNS: dict[SortKey, Any] = {
    **METRIC_COLUMNS,
    SortKey.CREATED_AT: Submission.created_at,
    SortKey.NAME: func.lower(Submission.display_name),
}


def default_order(sort: SortKey) -> SortOrder:
    """Best first for metrics, newest first for time, A to Z for names."""
    return SortOrder.ASC if sort is SortKey.NAME else SortOrder.DESC


# What a row shows, and nothing more: an evaluation's landscape, per-image records and
# examples are large JSON documents, and decoding them for every row of every request was
# most of a leaderboard's cost.
_ROW_COLUMNS = (
    Submission.id.label("submission_id"),
    Submission.display_name,
    User.name.label("owner"),
    Submission.architecture,
    Submission.model_format,
    Submission.training_method,
    Submission.extra_data,
    Submission.paper_url,
    Submission.is_baseline,
    *METRIC_COLUMNS.values(),
    Evaluation.images,
    Submission.created_at,
    Submission.finished_at,
)


def _filters(
    benchmark: str,
    training_method: TrainingMethod | None,
    architecture: str | None,
    search: str | None,
) -> list[ColumnElement[bool]]:
    where: list[ColumnElement[bool]] = [
        Submission.benchmark == benchmark,
        Submission.is_public.is_(True),
        Submission.is_flagged.is_(False),
        Submission.status == SubmissionStatus.FINISHED,
    ]
    if training_method is not None:
        where.append(Submission.training_method == training_method)
    if architecture:
        where.append(Submission.architecture == architecture)
    if search and search.strip():
        text = search.strip()
        where.append(
            or_(
                Submission.display_name.icontains(text, autoescape=True),
                Submission.description.icontains(text, autoescape=True),
                Submission.architecture.icontains(text, autoescape=True),
                User.name.icontains(text, autoescape=True),
            )
        )
    return where


Columns = TypeVarTuple("Columns")


def _joined(query: Select[*Columns], where: list[ColumnElement[bool]]) -> Select[*Columns]:
    return (
        query.select_from(Submission)
        .join(Evaluation, Evaluation.submission_id == Submission.id)
        .join(User, User.id == Submission.owner_id)
        .where(*where)
    )


def leaderboard(
    session: Session,
    benchmark: str,
    *,
    sort: SortKey = SortKey.GRID,
    order: SortOrder | None = None,
    training_method: TrainingMethod | None = None,
    architecture: str | None = None,
    search: str | None = None,
    page: int = 1,
    per_page: int | None = 50,
) -> LeaderboardPage:
    """One page of ``benchmark``'s leaderboard (``per_page=None``: every row on one page).

    ``search`` matches the display name, description, architecture or owner, case-insensitive.
    Does not check that the benchmark exists (an unknown one has no rows).
    """
    order = order or default_order(sort)
    page = max(1, page)
    if per_page is not None:
        per_page = min(max(1, per_page), MAX_PER_PAGE)
    key = _SORT_COLUMNS[sort]
    primary = key.asc() if order is SortOrder.ASC else key.desc()
    where = _filters(benchmark, training_method, architecture, search)
    total = session.scalar(_joined(select(func.count()), where)) or 0
    rank = func.rank().over(order_by=primary.nulls_last()).label("rank")
    query = _joined(select(*_ROW_COLUMNS, rank), where).order_by(
        primary.nulls_last(),
        Evaluation.grid.desc().nulls_last(),
        Submission.created_at.asc(),
        Submission.id.asc(),
    )
    if per_page is not None:
        query = query.limit(per_page).offset((page - 1) * per_page)
    rows = [LeaderboardRow.model_validate(row._mapping) for row in session.execute(query)]
    return LeaderboardPage(
        benchmark=benchmark,
        sort=sort,
        order=order,
        page=page,
        per_page=per_page if per_page is not None else max(1, int(total)),
        total=int(total),
        rows=rows,
    )


def best_values(
    session: Session,
    benchmark: str,
    *,
    training_method: TrainingMethod | None = None,
    architecture: str | None = None,
    search: str | None = None,
) -> dict[SortKey, float]:
    """The highest value of each metric over every row the filters match, in one query
    (metrics nobody has are left out)."""
    where = _filters(benchmark, training_method, architecture, search)
    keys = list(METRIC_COLUMNS)
    query = _joined(select(*(func.max(METRIC_COLUMNS[k]) for k in keys)), where)
    values = session.execute(query).one()
    return {key: float(value) for key, value in zip(keys, values, strict=True) if value is not None}


def best_values_for_board(
    session: Session,
    benchmark: str,
    board: LeaderboardPage,
    keys: Iterable[str],
    *,
    training_method: TrainingMethod | None = None,
    architecture: str | None = None,
    search: str | None = None,
) -> dict[str, float]:
    """The best (highest) value of each metric in ``keys`` over every row that matches the
    filters, not only ``board``'s page: the top row when the same filtered board is sorted by
    that metric. Read from the page when it holds every row (no query), empty when there is
    nothing to compare."""
    keys = tuple(keys)
    if board.total < 2:
        return {}
    if board.total <= len(board.rows):
        best: dict[str, float] = {}
        for key in keys:
            values = [getattr(r, key) for r in board.rows if getattr(r, key) is not None]
            if values:
                best[key] = max(values)
        return best
    found = best_values(
        session, benchmark, training_method=training_method, architecture=architecture,
        search=search,
    )  # fmt: skip
    return {key.value: value for key, value in found.items() if key.value in keys}


def board_version(session: Session, benchmark: str) -> tuple[Any, ...]:
    """A value that changes whenever ``benchmark``'s board does: a row finishes, leaves
    (flagged, made private, queued again), is re-evaluated or marked as a baseline. One
    aggregate query, so a cached rendering is reused only while it is exact."""
    where = _filters(benchmark, None, None, None)
    query = _joined(
        select(
            func.count(),
            func.max(Submission.finished_at),
            func.max(Evaluation.id),
            func.sum(case((Submission.is_baseline.is_(True), 1), else_=0)),
        ),
        where,
    )
    return tuple(session.execute(query).one())


class BoardCache:
    """Rendered leaderboards (JSON, CSV, HTML) by what was asked and the board's version, so
    pollers of an unchanged board cost a version query instead of a query, a validation and a
    rendering; least recently used entries go first. Shared by the threads of one app."""

    def __init__(self, size: int = 256) -> None:
        self.size = size
        self._entries: OrderedDict[Hashable, bytes] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def etag(key: Hashable) -> str:
        return '"' + hashlib.sha256(repr(key).encode()).hexdigest()[:24] + '"'

    def get(self, key: Hashable, render: Callable[[], bytes]) -> bytes:
        with self._lock:
            body = self._entries.get(key)
            if body is not None:
                self._entries.move_to_end(key)
                return body
        # Rendered outside the lock: two threads may both render a new version once.
        body = render()
        with self._lock:
            self._entries[key] = body
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
        return body


def leaderboard_document(
    session: Session, cache: BoardCache, benchmark: str, csv: bool = False, **query: Any
) -> tuple[bytes, str]:
    """`leaderboard` (``query`` are its keyword arguments) as JSON or CSV bytes, from
    ``cache`` while the board is unchanged, and the ETag of that rendering."""
    key = ("csv" if csv else "json", benchmark, tuple(sorted(query.items())),
           board_version(session, benchmark))  # fmt: skip

    def render() -> bytes:
        page = leaderboard(session, benchmark, **query)
        return leaderboard_csv(page).encode() if csv else page.model_dump_json().encode()

    return cache.get(key, render), cache.etag(key)


CSV_COLUMNS = tuple(LeaderboardRow.model_fields)


def _cell(value: object) -> object:
    if value is None:
        return ""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        # A spreadsheet would run user text that starts like a formula.
        return "'" + value
    return value


def leaderboard_csv(page: LeaderboardPage) -> str:
    """The page as CSV: a header row of ``CSV_COLUMNS``, then one row per entry."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in page.rows:
        data = row.model_dump(mode="json")
        writer.writerow([_cell(data[column]) for column in CSV_COLUMNS])
    return out.getvalue()
