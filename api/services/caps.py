"""Per-user caps on submitting: a daily count (new submissions plus resubmissions) and a count
of queued or running ones. Admins have none.

Read-only: the caller owns the transaction.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from api.errors import RateLimited
from api.urls import api_path
from config.settings import Settings
from db.models import Resubmission, Submission, SubmissionStatus, User, utcnow

__all__ = ["ACTIVE_STATUSES", "Usage", "check_caps", "limits", "usage"]

ACTIVE_STATUSES = (SubmissionStatus.QUEUED, SubmissionStatus.RUNNING)
DAY = timedelta(days=1)
# When a user waits on their own running jobs there is no exact time to give; ask them to
# come back after this long (the message says what they are waiting for).
CONCURRENT_RETRY_S = 60


@dataclass(frozen=True)
class Usage:
    last_24h: int
    oldest_in_window: datetime | None
    active: int


def usage(session: Session, user: User, now: datetime | None = None) -> Usage:
    """How many submissions ``user`` made in the last 24 hours (new ones and resubmissions
    of failed or cancelled ones) and how many are queued or running."""
    now = now or utcnow()
    since = now - DAY
    count = 0
    firsts: list[datetime] = []
    for created_at, owner_id in (
        (Submission.created_at, Submission.owner_id),
        (Resubmission.created_at, Resubmission.owner_id),
    ):
        n, first = session.execute(
            select(func.count(), func.min(created_at)).where(
                owner_id == user.id, created_at > since
            )
        ).one()
        count += int(n)
        if first is not None:
            firsts.append(first)
    oldest = min(firsts, default=None)
    active = session.scalar(
        select(func.count()).where(
            Submission.owner_id == user.id, Submission.status.in_(ACTIVE_STATUSES)
        )
    )
    return Usage(last_24h=count, oldest_in_window=oldest, active=int(active or 0))


def limits(settings: Settings, user: User) -> tuple[int, int]:
    """(daily, concurrent) for ``user``: its own when set, else the settings' defaults."""
    daily = settings.daily_limit if user.daily_limit is None else user.daily_limit
    concurrent = (
        settings.concurrent_limit if user.concurrent_limit is None else user.concurrent_limit
    )
    return daily, concurrent


def check_caps(
    session: Session, settings: Settings, user: User, now: datetime | None = None
) -> None:
    """``RateLimited`` (429, with Retry-After) when ``user`` may not submit now. Admins may."""
    if user.is_admin:
        return
    now = now or utcnow()
    daily, concurrent = limits(settings, user)
    used = usage(session, user, now)
    if used.last_24h >= daily:
        if used.oldest_in_window is not None:
            free_at = used.oldest_in_window + DAY
            retry = max(1.0, (free_at - now).total_seconds())
            when = f"at {free_at.strftime('%Y-%m-%d %H:%M:%S')} UTC"
        else:  # a limit of 0
            retry, when = DAY.total_seconds(), "never under the current limit"
        raise RateLimited(
            f"You have made {used.last_24h} submissions in the last 24 hours, the daily limit "
            f"is {daily}. The next one is possible {when} (in {retry / 3600:.1f} h).",
            retry_after_s=retry,
        )
    if used.active >= concurrent:
        raise RateLimited(
            f"You have {used.active} submissions queued or running, the limit is {concurrent}. "
            "Submit again when one of them has finished "
            f"(GET {api_path('/submissions?status=queued')} "
            "lists them), or cancel one.",
            retry_after_s=CONCURRENT_RETRY_S,
        )
