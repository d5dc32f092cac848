"""The reaper: jobs whose worker stopped beating go back to the queue, or fail after
``max_attempts`` starts.

`reap` is a plain function on a session (it flushes, the caller commits and then enqueues the
ids it returns). Every worker runs it on a timer (`ReaperThread`); running it in several
places at once is safe, because each row changes with a conditional UPDATE that only one of
them wins. ``spatialbench reap`` runs it once.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, and_, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from db.models import Submission, SubmissionStatus, utcnow
from db.session import transaction
from spatialbench.settings import Settings
from worker.runner import give_up_message

log = logging.getLogger(__name__)

__all__ = ["ReaperThread", "reap", "reap_once"]


def reap(
    session: Session, now: datetime, settings: Settings, *, queue_empty: bool = False
) -> list[str]:
    """Settle running jobs whose heartbeat is older than ``heartbeat_timeout_s``; return the
    ids to enqueue again.

    Such a job is cancelled if its cancel was requested, failed with an explanation once it has
    been started ``max_attempts`` times, and otherwise set back to ``queued``. With
    ``queue_empty`` (the broker holds no message for the queue), queued jobs that have waited
    longer than the timeout are returned as well: their message was lost (the embedded broker
    drops messages a killed worker had taken). Flushes, never commits.
    """
    stale = now - timedelta(seconds=settings.heartbeat_timeout_s)
    dead = and_(
        Submission.status == SubmissionStatus.RUNNING,
        or_(Submission.heartbeat_at.is_(None), Submission.heartbeat_at < stale),
    )
    requeue: list[str] = []
    ids = session.scalars(select(Submission.id).where(dead)).all()
    for submission_id in ids:
        row = and_(Submission.id == submission_id, dead)
        if _update(
            session,
            and_(row, Submission.cancel_requested.is_(True)),
            status=SubmissionStatus.CANCELLED,
            finished_at=now,
            eta_seconds=None,
            message="Cancelled by its owner while it was running.",
        ):
            log.info("reaper: %s cancelled", submission_id)
        elif _update(
            session,
            and_(row, Submission.attempts >= settings.max_attempts),
            status=SubmissionStatus.FAILED,
            finished_at=now,
            eta_seconds=None,
            message=give_up_message(settings),
        ):
            log.warning("reaper: %s failed after %d attempts", submission_id, settings.max_attempts)
        elif _update(
            session,
            row,
            status=SubmissionStatus.QUEUED,
            worker=None,
            phase="requeued",
            eta_seconds=None,
            # Marks when it was last handed to the broker (see below).
            heartbeat_at=now,
            message="Its worker stopped responding; it is queued to run again.",
        ):
            log.warning("reaper: %s requeued (heartbeat stopped)", submission_id)
            requeue.append(submission_id)
    if queue_empty:
        waiting = and_(
            Submission.status == SubmissionStatus.QUEUED,
            Submission.cancel_requested.is_(False),
            or_(
                Submission.heartbeat_at < stale,
                and_(Submission.heartbeat_at.is_(None), Submission.created_at < stale),
            ),
        )
        for submission_id in session.scalars(select(Submission.id).where(waiting)).all():
            if _update(session, and_(Submission.id == submission_id, waiting), heartbeat_at=now):
                log.warning(
                    "reaper: %s was queued without a message; enqueued again", submission_id
                )
                requeue.append(submission_id)
    session.flush()
    return requeue


def _update(session: Session, where: ColumnElement[bool], **values: object) -> int:
    result = session.execute(
        update(Submission)
        .where(where)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


def reap_once(
    sessions: sessionmaker[Session],
    settings: Settings,
    enqueue: Callable[[str], None],
    *,
    queue_empty: bool = False,
) -> list[str]:
    """`reap` in its own transaction, then enqueue what it returned (after the commit)."""
    with transaction(sessions) as session:
        ids = reap(session, utcnow(), settings, queue_empty=queue_empty)
    for submission_id in ids:
        enqueue(submission_id)
    return ids


class ReaperThread(threading.Thread):
    """Runs `reap_once` every ``reaper_interval_s`` in the worker process until stopped.

    ``queue_is_empty`` asks the broker whether the evaluation queue holds no message; errors
    (the database or broker away) are logged and the next round tries again.
    """

    def __init__(
        self,
        sessions: sessionmaker[Session],
        settings: Settings,
        enqueue: Callable[[str], None],
        queue_is_empty: Callable[[], bool] | None = None,
    ) -> None:
        super().__init__(name="spatialbench-reaper", daemon=True)
        self.sessions = sessions
        self.settings = settings
        self.enqueue = enqueue
        self.queue_is_empty = queue_is_empty
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            empty = False
            if self.queue_is_empty is not None:
                try:
                    empty = self.queue_is_empty()
                except Exception as exc:  # the broker is away, or busy: settle the rest
                    log.info("reaper: could not look at the queue (%s)", exc)
            try:
                reap_once(self.sessions, self.settings, self.enqueue, queue_empty=empty)
            except Exception:
                log.warning("reaper round failed", exc_info=True)
            self.stopped.wait(self.settings.reaper_interval_s)

    def stop(self) -> None:
        self.stopped.set()
