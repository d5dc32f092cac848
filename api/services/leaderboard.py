"""The leaderboard of a benchmark: public, finished, unflagged submissions with their metrics.

Rows are ranked by the sort key with ties sharing a rank (SQL ``RANK()``), over the filtered
set; missing values sort last whatever the order. The default is the paper's headline: grid
accuracy, best first.
"""

from __future__ import annotations

import csv
import io
from typing import Any

from sqlalchemy import ColumnElement, func, or_, select
from sqlalchemy.orm import Session

from api.schemas import LeaderboardPage, LeaderboardRow, SortKey, SortOrder
from db.models import Evaluation, Submission, SubmissionStatus, TrainingMethod, User

__all__ = ["CSV_COLUMNS", "default_order", "leaderboard", "leaderboard_csv"]

MAX_PER_PAGE = 500

_SORT_COLUMNS: dict[SortKey, Any] = {
    SortKey.NATURAL: Evaluation.natural,
    SortKey.RANDOM: Evaluation.random,
    SortKey.WORST_OF_K: Evaluation.worst_of_k,
    SortKey.GRID: Evaluation.grid,
    SortKey.VOTE_NATURAL: Evaluation.vote_natural,
    SortKey.GRID_VOTE: Evaluation.grid_vote,
    SortKey.CREATED_AT: Submission.created_at,
    SortKey.NAME: func.lower(Submission.display_name),
}


def default_order(sort: SortKey) -> SortOrder:
    """Best first for metrics, newest first for time, A to Z for names."""
    return SortOrder.ASC if sort is SortKey.NAME else SortOrder.DESC


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
    joined = (
        select(Submission, Evaluation, User.name)
        .join(Evaluation, Evaluation.submission_id == Submission.id)
        .join(User, User.id == Submission.owner_id)
        .where(*where)
    )
    total = session.scalar(select(func.count()).select_from(joined.subquery())) or 0
    rank = func.rank().over(order_by=primary.nulls_last()).label("rank")
    query = joined.add_columns(rank).order_by(
        primary.nulls_last(),
        Evaluation.grid.desc().nulls_last(),
        Submission.created_at.asc(),
        Submission.id.asc(),
    )
    if per_page is not None:
        query = query.limit(per_page).offset((page - 1) * per_page)
    rows = [
        LeaderboardRow(
            rank=int(row_rank),
            submission_id=sub.id,
            display_name=sub.display_name,
            owner=owner_name,
            architecture=sub.architecture,
            model_format=sub.model_format,
            training_method=sub.training_method,
            extra_data=sub.extra_data,
            paper_url=sub.paper_url,
            is_baseline=sub.is_baseline,
            natural=ev.natural,
            random=ev.random,
            worst_of_k=ev.worst_of_k,
            grid=ev.grid,
            vote_natural=ev.vote_natural,
            grid_vote=ev.grid_vote,
            images=ev.images,
            created_at=sub.created_at,
            finished_at=sub.finished_at,
        )
        for sub, ev, owner_name, row_rank in session.execute(query)
    ]
    return LeaderboardPage(
        benchmark=benchmark,
        sort=sort,
        order=order,
        page=page,
        per_page=per_page if per_page is not None else max(1, int(total)),
        total=int(total),
        rows=rows,
    )


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
