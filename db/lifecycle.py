"""The lifecycle of a submission, in one place: every transition is one function here, made
atomic by a conditional ``UPDATE ... WHERE`` that states the states it may start from.

    queued -> running -> finished | failed | cancelled
    failed | cancelled | (queued or running with a cancel request) -> queued   (resubmit)
    running, heartbeat stopped -> queued (same place in the queue) | failed | cancelled  (reap)

The API (cancel, resubmit), the worker's task (claim, heartbeat, finish, fail, cancelled) and
the reaper call these and nothing else to change a submission's state. Every function flushes
(the UPDATE is sent) and never commits: the caller owns the transaction.

Fencing: each claim writes a new random ``claim_token``; every later write of that run is
conditional on it. A token never repeats, so a worker that was frozen, reaped, cancelled or
outlived a resubmit can change nothing, whatever happened meanwhile.

Queue order: ``queued_at`` is set on submit and resubmit and kept when a job whose worker died
runs again; workers take the oldest queued job (`claim_next`), so the broker only delivers
"there is work" and the database decides which. ``published_at`` is when the id was last
handed to the broker; `reap` hands it again after ``republish_after_s``, oldest first, so a
lost message delays a job by at most that long.

Every transition of the lifecycle in one place is the point of this module, so it stays one
file past the usual length: each transition's fence is read and checked against the others.
"""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, Protocol

from sqlalchemy import ColumnElement, and_, delete, exists, or_, select, update
from sqlalchemy.orm import Session

from db.models import Evaluation, Resubmission, Shard, Submission, SubmissionStatus

__all__ = [
    "CANCELLED_BEFORE_START",
    "CANCELLED_WHILE_RUNNING",
    "CancelOutcome",
    "Claim",
    "FinishOutcome",
    "JobConfig",
    "LifecycleSettings",
    "RunState",
    "cancel_run",
    "claim",
    "claim_next",
    "fail",
    "fence",
    "finish",
    "give_up_message",
    "heartbeat",
    "reap",
    "request_cancel",
    "requeue",
    "submit",
]

CANCELLED_BEFORE_START = "Cancelled by its owner before it started."
CANCELLED_WHILE_RUNNING = "Cancelled by its owner while it was running."
WORKER_STOPPED = "Its worker stopped responding; it is queued to run again."
# How many of the oldest candidates `claim_next` tries before giving up on this round (others
# are claiming them at the same moment).
CLAIM_CANDIDATES = 20


class LifecycleSettings(Protocol):
    """What the transitions need of the settings (``config.settings.Settings`` fits)."""

    heartbeat_timeout_s: float
    max_attempts: int
    republish_after_s: float


def give_up_message(max_attempts: int) -> str:
    return (
        f"The evaluation was started {max_attempts} times and each time its worker "
        "stopped responding (crashed, killed or lost its connection), so it was given up. "
        "This is usually the machine running out of memory: a smaller model or one that uses "
        "less memory per image may fit; otherwise contact the operator."
    )


@dataclass(frozen=True)
class Claim:
    submission_id: str
    token: str
    attempt: int
    worker: str


@dataclass(frozen=True)
class JobConfig:
    """Everything a result depends on besides the benchmark's code and data: stored with the
    result, and compared with the submission's settings before the result is accepted."""

    file_sha256: str
    model_format: str
    architecture: str | None
    mean: list[float] | None
    std: list[float] | None
    benchmark: str
    limit: int | None

    @classmethod
    def of(cls, submission: Submission, limit: int | None) -> JobConfig:
        return cls(
            file_sha256=submission.file_sha256,
            model_format=submission.model_format.value,
            architecture=submission.architecture,
            mean=list(submission.mean) if submission.mean is not None else None,
            std=list(submission.std) if submission.std is not None else None,
            benchmark=submission.benchmark,
            limit=limit,
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobConfig:
        values: dict[str, Any] = {name: data.get(name) for name in cls.__dataclass_fields__}
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _update(session: Session, where: ColumnElement[bool], **values: Any) -> int:
    result = session.execute(
        update(Submission)
        .where(where)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


def _stale(now: datetime, settings: LifecycleSettings) -> ColumnElement[bool]:
    """Running, but its worker has not written a heartbeat within the timeout. A run cut into
    shards is never stale as a whole: its shards are reaped one by one (`db.shards.reap`)."""
    limit = now - timedelta(seconds=settings.heartbeat_timeout_s)
    return and_(
        Submission.status == SubmissionStatus.RUNNING,
        or_(Submission.heartbeat_at.is_(None), Submission.heartbeat_at < limit),
        ~exists().where(
            Shard.submission_id == Submission.id, Shard.run_token == Submission.claim_token
        ),
    )


def fence(claim: Claim) -> ColumnElement[bool]:
    """The submission still runs under ``claim`` (every write of a run is conditional on it)."""
    return and_(
        Submission.id == claim.submission_id,
        Submission.claim_token == claim.token,
        Submission.status == SubmissionStatus.RUNNING,
    )


_FRESH_RUN: dict[str, Any] = {
    "phase": None,
    "progress": 0.0,
    "forward_passes": 0,
    "eta_seconds": None,
    "message": None,
    "worker": None,
    "claim_token": None,
    "started_at": None,
    "finished_at": None,
    "heartbeat_at": None,
}


# --- Submit and resubmit (the API) ------------------------------------------------------------


def submit(session: Session, submission: Submission, now: datetime) -> Submission:
    """Add a new submission, queued at ``now`` and about to be published."""
    submission.status = SubmissionStatus.QUEUED
    submission.queued_at = now
    submission.published_at = now
    session.add(submission)
    session.flush()
    return submission


def requeue(session: Session, submission_id: str, owner_id: int, now: datetime) -> bool:
    """Queue a failed or cancelled submission again (a resubmit by its owner), or one whose
    cancel was requested and not yet carried out: the resubmit wins, and the old run, whose
    token is cleared, stops at its next heartbeat. It goes to the back of the queue and
    counts as a submission towards the daily cap. False when it is in none of those states."""
    requeued = _update(
        session,
        and_(
            Submission.id == submission_id,
            or_(
                Submission.status.in_((SubmissionStatus.FAILED, SubmissionStatus.CANCELLED)),
                and_(
                    Submission.status.in_((SubmissionStatus.QUEUED, SubmissionStatus.RUNNING)),
                    Submission.cancel_requested.is_(True),
                ),
            ),
        ),
        **_FRESH_RUN,
        status=SubmissionStatus.QUEUED,
        attempts=0,
        cancel_requested=False,
        queued_at=now,
        published_at=now,
    )
    if requeued:
        session.add(Resubmission(submission_id=submission_id, owner_id=owner_id, created_at=now))
        session.flush()
    return bool(requeued)


class CancelOutcome(StrEnum):
    # It was queued: cancelled at once.
    CANCELLED = "cancelled"
    # It is running: its worker stops it within seconds.
    REQUESTED = "requested"
    # Already cancelled, or its cancel was already requested: nothing changed.
    ALREADY = "already"
    # Finished or failed: nothing to cancel.
    FINAL = "final"
    MISSING = "missing"


def request_cancel(session: Session, submission_id: str, now: datetime) -> CancelOutcome:
    """Cancel a queued submission, or ask the worker of a running one to stop."""
    row = Submission.id == submission_id
    if _update(
        session,
        and_(row, Submission.status == SubmissionStatus.QUEUED),
        status=SubmissionStatus.CANCELLED,
        finished_at=now,
        eta_seconds=None,
        message=CANCELLED_BEFORE_START,
    ):
        return CancelOutcome.CANCELLED
    if _update(
        session,
        and_(
            row,
            Submission.status == SubmissionStatus.RUNNING,
            Submission.cancel_requested.is_(False),
        ),
        cancel_requested=True,
    ):
        return CancelOutcome.REQUESTED
    status = session.scalar(select(Submission.status).where(row))
    if status is None:
        return CancelOutcome.MISSING
    if status in (SubmissionStatus.FINISHED, SubmissionStatus.FAILED):
        return CancelOutcome.FINAL
    return CancelOutcome.ALREADY


# --- Claim, heartbeat, outcome (the worker) ---------------------------------------------------


def _claimable(now: datetime, settings: LifecycleSettings) -> ColumnElement[bool]:
    return and_(
        Submission.cancel_requested.is_(False),
        or_(Submission.status == SubmissionStatus.QUEUED, _stale(now, settings)),
    )


def _settle(
    session: Session, submission_id: str, now: datetime, settings: LifecycleSettings
) -> None:
    """A job nobody may claim any more: out of attempts (failed), or a queued one whose
    cancel was requested (cancelled)."""
    row = Submission.id == submission_id
    _update(
        session,
        and_(row, _claimable(now, settings), Submission.attempts >= settings.max_attempts),
        status=SubmissionStatus.FAILED,
        finished_at=now,
        eta_seconds=None,
        claim_token=None,
        message=give_up_message(settings.max_attempts),
    )
    _update(
        session,
        and_(
            row, Submission.cancel_requested.is_(True), Submission.status == SubmissionStatus.QUEUED
        ),
        status=SubmissionStatus.CANCELLED,
        finished_at=now,
        eta_seconds=None,
        message=CANCELLED_BEFORE_START,
    )


def claim(
    session: Session, submission_id: str, worker: str, now: datetime, settings: LifecycleSettings
) -> Claim | None:
    """Take the job if it is free: queued, or running with a stopped heartbeat, and started
    fewer than ``max_attempts`` times. None when it is not free (it may have been settled on
    the way: failed when out of attempts, cancelled when its cancel was requested)."""
    token = uuid.uuid4().hex
    if _update(
        session,
        and_(
            Submission.id == submission_id,
            _claimable(now, settings),
            Submission.attempts < settings.max_attempts,
        ),
        **{
            **_FRESH_RUN,
            "status": SubmissionStatus.RUNNING,
            "attempts": Submission.attempts + 1,
            "claim_token": token,
            "worker": worker,
            "heartbeat_at": now,
            "started_at": now,
            "phase": "starting",
        },
    ):
        attempt = session.scalar(select(Submission.attempts).where(Submission.id == submission_id))
        return Claim(submission_id, token, int(attempt or 0), worker)
    _settle(session, submission_id, now, settings)
    return None


def claim_next(
    session: Session, worker: str, now: datetime, settings: LifecycleSettings
) -> Claim | None:
    """Take the oldest free job (by ``queued_at``), whichever message brought the worker here."""
    candidates = session.scalars(
        select(Submission.id)
        .where(_claimable(now, settings))
        .order_by(Submission.queued_at, Submission.id)
        .limit(CLAIM_CANDIDATES)
    ).all()
    for submission_id in candidates:
        taken = claim(session, submission_id, worker, now, settings)
        if taken is not None:
            return taken
    return None


class RunState(StrEnum):
    CONTINUE = "continue"
    CANCEL = "cancel"
    # The claim is no longer this worker's (reaped, resubmitted, claimed elsewhere).
    LOST = "lost"


def heartbeat(
    session: Session, claim: Claim, now: datetime, progress: dict[str, Any] | None = None
) -> RunState:
    """Record that the run is alive (and its progress); say whether to go on."""
    if not _update(session, fence(claim), heartbeat_at=now, **(progress or {})):
        return RunState.LOST
    asked = session.scalar(
        select(Submission.cancel_requested).where(Submission.id == claim.submission_id)
    )
    return RunState.CANCEL if asked else RunState.CONTINUE


def fail(session: Session, claim: Claim, message: str, now: datetime) -> bool:
    """The run failed with ``message`` (for the user); False if the claim was lost."""
    return bool(
        _update(
            session,
            fence(claim),
            status=SubmissionStatus.FAILED,
            message=message,
            finished_at=now,
            heartbeat_at=now,
            eta_seconds=None,
        )
    )


def cancel_run(session: Session, claim: Claim, now: datetime) -> bool:
    """The run stopped because its cancel was requested; False if the claim was lost."""
    return bool(
        _update(
            session,
            and_(fence(claim), Submission.cancel_requested.is_(True)),
            status=SubmissionStatus.CANCELLED,
            message=CANCELLED_WHILE_RUNNING,
            finished_at=now,
            heartbeat_at=now,
            eta_seconds=None,
        )
    )


class FinishOutcome(StrEnum):
    FINISHED = "finished"
    CANCELLED = "cancelled"
    # Not this claim's to record; nothing was written.
    LOST = "lost"


def finish(
    session: Session,
    claim: Claim,
    evaluation: Evaluation,
    job: JobConfig,
    now: datetime,
    *,
    computed_under: str | None = None,
) -> FinishOutcome:
    """Record ``evaluation``, computed for ``job``, under ``claim``: the row becomes finished
    with the result, or, when the claim was lost or the submission's settings are no longer
    the job's, nothing is written. A run whose cancel was requested is cancelled instead.
    ``computed_under``: the token of an earlier claim whose run computed a stored result with
    the same ``job`` (see worker.results); by default this claim's."""
    submission = session.scalar(
        select(Submission).where(fence(claim)).execution_options(populate_existing=True)
    )
    if submission is None:
        return FinishOutcome.LOST
    # The token guards this already (settings change only through a resubmit, which clears
    # it); a mismatch here would be a bug elsewhere, and must not become a wrong result.
    if JobConfig.of(submission, job.limit) != job:
        return FinishOutcome.LOST
    if submission.cancel_requested:
        return FinishOutcome.CANCELLED if cancel_run(session, claim, now) else FinishOutcome.LOST
    if not _update(
        session,
        and_(fence(claim), Submission.cancel_requested.is_(False)),
        status=SubmissionStatus.FINISHED,
        phase="done",
        progress=1.0,
        forward_passes=evaluation.forward_passes,
        eta_seconds=0.0,
        message=None,
        finished_at=now,
        heartbeat_at=now,
    ):
        return FinishOutcome.LOST
    # An earlier run's row (a result recorded, then the job resubmitted) gives way.
    session.execute(delete(Evaluation).where(Evaluation.submission_id == claim.submission_id))
    evaluation.submission_id = claim.submission_id
    evaluation.job = {
        **job.to_dict(),
        "claim_token": claim.token,
        "computed_under": computed_under or claim.token,
    }
    session.add(evaluation)
    session.flush()
    return FinishOutcome.FINISHED


# --- The reaper -------------------------------------------------------------------------------


def reap(session: Session, now: datetime, settings: LifecycleSettings) -> list[str]:
    """Settle running jobs whose heartbeat stopped, and return the ids to publish again,
    oldest first.

    A stale running job is cancelled if its cancel was requested, failed once it has been
    started ``max_attempts`` times, and otherwise queued again in its old place. Queued jobs
    whose last publish is older than ``republish_after_s`` (their message may be lost: a
    failed enqueue, a broker restart, a worker killed holding it) are published again,
    whether or not the broker holds other messages. Duplicates are harmless: a worker takes a
    job only through `claim`.
    """
    stale = _stale(now, settings)
    for submission_id in session.scalars(select(Submission.id).where(stale)).all():
        row = and_(Submission.id == submission_id, stale)
        if _update(
            session,
            and_(row, Submission.cancel_requested.is_(True)),
            status=SubmissionStatus.CANCELLED,
            finished_at=now,
            eta_seconds=None,
            claim_token=None,
            message=CANCELLED_WHILE_RUNNING,
        ):
            continue
        if _update(
            session,
            and_(row, Submission.attempts >= settings.max_attempts),
            status=SubmissionStatus.FAILED,
            finished_at=now,
            eta_seconds=None,
            claim_token=None,
            message=give_up_message(settings.max_attempts),
        ):
            continue
        _update(
            session,
            row,
            status=SubmissionStatus.QUEUED,
            worker=None,
            claim_token=None,
            phase="requeued",
            eta_seconds=None,
            published_at=None,
            message=WORKER_STOPPED,
        )
    overdue = and_(
        Submission.status == SubmissionStatus.QUEUED,
        Submission.cancel_requested.is_(False),
        or_(
            Submission.published_at.is_(None),
            Submission.published_at < now - timedelta(seconds=settings.republish_after_s),
        ),
    )
    ids = session.scalars(
        select(Submission.id).where(overdue).order_by(Submission.queued_at, Submission.id)
    ).all()
    published = [
        submission_id
        for submission_id in ids
        if _update(session, and_(Submission.id == submission_id, overdue), published_at=now)
    ]
    session.flush()
    return published
