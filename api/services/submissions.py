"""Submissions once they exist: read one or a user's list, count them by status, cancel,
mark a baseline. Accepting an upload is `api.services.submit`; the per-user caps are
`api.services.caps`; the API's view of a row is `api.schemas.SubmissionPublic`.

These functions flush and never commit: the caller owns the transaction (the API's request
session, or ``db.session.session_scope`` elsewhere).
"""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session, joinedload, selectinload

from api.errors import Conflict, Forbidden, NotFound
from db import lifecycle
from db.lifecycle import CancelOutcome
from db.models import Submission, SubmissionStatus, User, utcnow

__all__ = [
    "cancel_submission",
    "count_by_status",
    "get_submission",
    "list_submissions",
    "mark_baseline",
    "refresh_columns",
    "visible_to",
]


# --- Read -------------------------------------------------------------------------------------


def visible_to(submission: Submission, viewer: User | None) -> bool:
    if submission.is_public:
        return True
    return viewer is not None and (viewer.is_admin or viewer.id == submission.owner_id)


def get_submission(session: Session, submission_id: str, viewer: User | None) -> Submission:
    """The submission with its owner and evaluation loaded; ``NotFound`` also when it is
    private and ``viewer`` is neither its owner nor an admin."""
    # One query (joins), not three: this is what every status poll runs.
    submission = session.scalar(
        select(Submission)
        .options(joinedload(Submission.owner), joinedload(Submission.evaluation))
        .where(Submission.id == submission_id)
    )
    if submission is None or not visible_to(submission, viewer):
        raise NotFound(f"No submission {submission_id!r} (or it is private).")
    return submission


def list_submissions(
    session: Session,
    owner: User,
    *,
    status: SubmissionStatus | None = None,
    benchmark: str | None = None,
    limit: int = 50,
    offset: int = 0,
) -> tuple[list[Submission], int]:
    """``owner``'s submissions, newest first, and how many match in all."""
    where = [Submission.owner_id == owner.id]
    if status is not None:
        where.append(Submission.status == status)
    if benchmark is not None:
        where.append(Submission.benchmark == benchmark)
    total = session.scalar(select(func.count()).select_from(Submission).where(*where)) or 0
    items = session.scalars(
        select(Submission)
        .options(selectinload(Submission.owner), selectinload(Submission.evaluation))
        .where(*where)
        .order_by(Submission.created_at.desc(), Submission.id)
        .limit(limit)
        .offset(offset)
    ).all()
    return list(items), int(total)


def count_by_status(session: Session) -> dict[SubmissionStatus, int]:
    """How many submissions are in each status (every status present, zeros included)."""
    counts = dict.fromkeys(SubmissionStatus, 0)
    for status, count in session.execute(
        select(Submission.status, func.count()).group_by(Submission.status)
    ):
        counts[SubmissionStatus(status)] = int(count)
    return counts


# --- Cancel -----------------------------------------------------------------------------------


def cancel_submission(session: Session, submission: Submission, user: User) -> Submission:
    """Cancel ``submission`` on behalf of ``user`` (its owner or an admin).

    Queued: cancelled at once. Running: ``cancel_requested`` is set and the worker stops it
    within seconds. Already cancelled, or cancel already requested: nothing changes. Finished
    or failed: ``Conflict``. See `db.lifecycle.request_cancel`.
    """
    if submission.owner_id != user.id and not user.is_admin:
        raise Forbidden("Only the owner of a submission can cancel it.")
    outcome = lifecycle.request_cancel(session, submission.id, utcnow())
    refresh_columns(session, submission)
    if outcome is CancelOutcome.FINAL:
        raise Conflict(
            f"The submission has already {submission.status.value}; there is nothing to cancel."
        )
    return submission


def refresh_columns(session: Session, submission: Submission) -> None:
    """Read ``submission``'s columns again after a lifecycle transition changed them in SQL.

    Columns only: a plain refresh would expire the loaded (lazy="raise") relationships."""
    session.refresh(submission, [attr.key for attr in Submission.__mapper__.column_attrs])


# --- Operator markers -------------------------------------------------------------------------


def mark_baseline(session: Session, submission_id: str, value: bool = True) -> Submission:
    """Mark a submission as a reference model trained by the operators (or unmark it)."""
    submission = session.get(Submission, submission_id)
    if submission is None:
        raise NotFound(f"No submission {submission_id!r}.")
    submission.is_baseline = value
    session.flush()
    return submission
