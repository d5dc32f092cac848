"""The lifecycle of a shard: one range of a running submission's evaluation order.

    (submission claimed) -> planned: queued -> running -> done
    running, heartbeat stopped -> queued (re-run alone) | the submission fails (out of attempts)

A submission that is claimed (`db.lifecycle.claim`) is cut into shards (`plan`), each a row
with the claim's token as ``run_token``. Any worker takes a queued shard of a running submission
(`claim_next_shard`, `claim_shard`), so many workers evaluate one submission at once. Every
write of a shard's run is fenced twice: by the shard's own ``claim_token``, and by the
submission still running under ``run_token``; a resubmit, a cancel or a reaped submission
therefore stops every shard of the old run.

The submission's own row carries the aggregate: each shard heartbeat writes the shard's
progress and then the submission's (progress weighted by shard size, forward passes summed, an
ETA from the rate so far) and its heartbeat, so the submission-level reaper leaves a sharded
run to `reap`, which hands a stopped shard to the next worker and republishes shards whose
message may be lost.

Like `db.lifecycle`, every function flushes and never commits. What ends or beats for the
whole run (its heartbeat, a failure, a cancel) goes through `db.lifecycle`'s own transitions.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, delete, exists, or_, select, update
from sqlalchemy.orm import Session

from db import lifecycle
from db.lifecycle import Claim, LifecycleSettings, RunState
from db.models import Shard, ShardStatus, Submission, SubmissionStatus

__all__ = [
    "ShardClaim",
    "claim_next_shard",
    "claim_shard",
    "finish_shard",
    "plan",
    "reap",
    "release_shard",
    "run_claim",
    "run_shards",
    "shard_heartbeat",
]

# How many candidates the claims try before giving up on this round (others claim them too).
CLAIM_CANDIDATES = 20


@dataclass(frozen=True)
class ShardClaim:
    submission_id: str
    index: int
    run_token: str
    token: str
    worker: str
    start: int
    stop: int
    attempt: int

    @property
    def positions(self) -> range:
        return range(self.start, self.stop)


def run_claim(shard: ShardClaim) -> Claim:
    """The submission-level claim of the run a shard belongs to (for finish, fail, cancel)."""
    return Claim(shard.submission_id, shard.run_token, shard.attempt, shard.worker)


def _running(submission_id: Any, run_token: Any) -> ColumnElement[bool]:
    """The submission is running under ``run_token`` and nobody asked to cancel it."""
    return exists().where(
        Submission.id == submission_id,
        Submission.claim_token == run_token,
        Submission.status == SubmissionStatus.RUNNING,
        Submission.cancel_requested.is_(False),
    )


def _update(session: Session, where: ColumnElement[bool], **values: Any) -> int:
    result = session.execute(
        update(Shard).where(where).values(**values).execution_options(synchronize_session=False)
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


def _fence(shard: ShardClaim) -> ColumnElement[bool]:
    return and_(
        Shard.submission_id == shard.submission_id,
        Shard.index == shard.index,
        Shard.claim_token == shard.token,
        Shard.status == ShardStatus.RUNNING,
    )


# --- Planning -----------------------------------------------------------------------------------


def plan(session: Session, claim: Claim, ranges: list[range], now: datetime) -> bool:
    """Cut the run of ``claim`` into ``ranges`` (queued, published at ``now``); False, with
    nothing written, when the claim was lost meanwhile. The shards of earlier runs go."""
    if session.scalar(select(Submission.id).where(lifecycle.fence(claim))) is None:
        return False
    session.execute(delete(Shard).where(Shard.submission_id == claim.submission_id))
    session.add_all(
        Shard(
            submission_id=claim.submission_id,
            index=i,
            run_token=claim.token,
            start=r.start,
            stop=r.stop,
            status=ShardStatus.QUEUED,
            attempts=0,
            progress=0.0,
            forward_passes=0,
            published_at=now,
        )
        for i, r in enumerate(ranges)
    )
    session.flush()
    return True


def run_shards(session: Session, submission_id: str, run_token: str) -> list[Shard]:
    """The shards of one run, in order."""
    return list(
        session.scalars(
            select(Shard)
            .where(Shard.submission_id == submission_id, Shard.run_token == run_token)
            .order_by(Shard.index)
            .execution_options(populate_existing=True)
        ).all()
    )


# --- Claim, heartbeat, done ---------------------------------------------------------------------


def claim_shard(
    session: Session,
    submission_id: str,
    run_token: str,
    worker: str,
    now: datetime,
    settings: LifecycleSettings,
) -> ShardClaim | None:
    """Take the first queued shard of the run, if the run still stands."""
    candidates = session.scalars(
        select(Shard.index)
        .where(
            Shard.submission_id == submission_id,
            Shard.run_token == run_token,
            Shard.status == ShardStatus.QUEUED,
        )
        .order_by(Shard.index)
        .limit(CLAIM_CANDIDATES)
    ).all()
    for index in candidates:
        token = uuid.uuid4().hex
        row = and_(
            Shard.submission_id == submission_id,
            Shard.index == index,
            Shard.run_token == run_token,
            Shard.status == ShardStatus.QUEUED,
        )
        if _update(
            session,
            and_(row, Shard.attempts < settings.max_attempts, _running(submission_id, run_token)),
            status=ShardStatus.RUNNING,
            claim_token=token,
            worker=worker,
            attempts=Shard.attempts + 1,
            phase="starting",
            progress=0.0,
            forward_passes=0,
            eta_seconds=None,
            started_at=now,
            heartbeat_at=now,
        ):
            shard = session.execute(
                select(Shard.start, Shard.stop, Shard.attempts).where(
                    Shard.submission_id == submission_id, Shard.index == index
                )
            ).one()
            return ShardClaim(
                submission_id,
                index,
                run_token,
                token,
                worker,
                shard.start,
                shard.stop,
                shard.attempts,
            )
    return None


def claim_next_shard(
    session: Session, worker: str, now: datetime, settings: LifecycleSettings
) -> ShardClaim | None:
    """Take a queued shard of the oldest running submission that has one."""
    runs = session.execute(
        select(Submission.id, Submission.claim_token)
        .where(
            Submission.status == SubmissionStatus.RUNNING,
            Submission.cancel_requested.is_(False),
            exists().where(
                Shard.submission_id == Submission.id,
                Shard.run_token == Submission.claim_token,
                Shard.status == ShardStatus.QUEUED,
            ),
        )
        .order_by(Submission.queued_at, Submission.id)
        .limit(CLAIM_CANDIDATES)
    ).all()
    for submission_id, run_token in runs:
        if run_token is None:
            continue
        taken = claim_shard(session, submission_id, run_token, worker, now, settings)
        if taken is not None:
            return taken
    return None


def shard_heartbeat(
    session: Session, shard: ShardClaim, now: datetime, progress: dict[str, Any] | None = None
) -> RunState:
    """Record that the shard's run is alive (and its progress), then the submission's
    aggregate; say whether to go on."""
    if not _update(session, _fence(shard), heartbeat_at=now, **(progress or {})):
        return RunState.LOST
    return _aggregate(session, shard, now)


def release_shard(session: Session, shard: ShardClaim) -> bool:
    """Give the shard back, queued (its run was cancelled or failed, or the worker stops):
    nothing of it runs any more, and a run that still stands may hand it to another worker."""
    return bool(
        _update(session, _fence(shard), status=ShardStatus.QUEUED, claim_token=None,
                worker=None, phase=None, progress=0.0, eta_seconds=None, published_at=None)
    )  # fmt: skip


def finish_shard(
    session: Session, shard: ShardClaim, result_key: str, forward_passes: int, now: datetime
) -> bool:
    """The shard's result is stored under ``result_key``; False if the shard was lost."""
    if not _update(
        session,
        _fence(shard),
        status=ShardStatus.DONE,
        result_key=result_key,
        forward_passes=forward_passes,
        progress=1.0,
        phase="done",
        eta_seconds=0.0,
        finished_at=now,
        heartbeat_at=now,
    ):
        return False
    return _aggregate(session, shard, now) is not RunState.LOST


def _aggregate(session: Session, shard: ShardClaim, now: datetime) -> RunState:
    """The run's heartbeat (`db.lifecycle.heartbeat`), with its progress summed over its
    shards."""
    shards = session.execute(
        select(Shard.start, Shard.stop, Shard.status, Shard.progress, Shard.forward_passes).where(
            Shard.submission_id == shard.submission_id, Shard.run_token == shard.run_token
        )
    ).all()
    size = sum(s.stop - s.start for s in shards) or 1
    done = sum(1 for s in shards if s.status is ShardStatus.DONE)
    fraction = (
        sum(
            (s.stop - s.start) * (1.0 if s.status is ShardStatus.DONE else s.progress)
            for s in shards
        )
        / size
    )
    started = session.scalar(
        select(Submission.started_at).where(Submission.id == shard.submission_id)
    )
    eta = None
    if started is not None and fraction > 0.0:
        elapsed = (now - started).total_seconds()
        eta = max(0.0, elapsed * (1.0 - fraction) / fraction)
    progress: dict[str, Any] = {
        "progress": min(max(fraction, 0.0), 0.999),
        "forward_passes": sum(s.forward_passes for s in shards),
        "eta_seconds": eta,
    }
    if len(shards) > 1:
        progress["phase"] = f"{done}/{len(shards)} shards done"
    return lifecycle.heartbeat(session, run_claim(shard), now, progress)


# --- The reaper ---------------------------------------------------------------------------------


def reap(session: Session, now: datetime, settings: LifecycleSettings) -> list[str]:
    """Hand stopped shards on, and return the submissions to publish again.

    A running shard whose heartbeat stopped is queued again (its run re-runs it alone), or,
    once it has been started ``max_attempts`` times, fails its submission. A sharded run whose
    cancel was requested and on which no shard is running any more is cancelled. Queued shards
    of a running submission whose last publish is older than ``republish_after_s`` are
    published again (the message names the submission; a worker takes any queued shard).
    """
    limit = now - timedelta(seconds=settings.heartbeat_timeout_s)
    stale = and_(
        Shard.status == ShardStatus.RUNNING,
        or_(Shard.heartbeat_at.is_(None), Shard.heartbeat_at < limit),
    )
    for shard in session.execute(
        select(Shard.submission_id, Shard.index, Shard.run_token, Shard.attempts).where(stale)
    ).all():
        row = and_(Shard.submission_id == shard.submission_id, Shard.index == shard.index, stale)
        if shard.attempts >= settings.max_attempts:
            run = _reaped_run(shard.submission_id, shard.run_token)
            lifecycle.fail(session, run, lifecycle.give_up_message(settings.max_attempts), now)
            continue
        _update(
            session,
            row,
            status=ShardStatus.QUEUED,
            claim_token=None,
            worker=None,
            phase="requeued",
            eta_seconds=None,
            published_at=None,
        )

    # A cancelled sharded run with nothing running: nobody is left to notice the request.
    cancelled = session.execute(
        select(Submission.id, Submission.claim_token).where(
            Submission.status == SubmissionStatus.RUNNING,
            Submission.cancel_requested.is_(True),
            exists().where(
                Shard.submission_id == Submission.id, Shard.run_token == Submission.claim_token
            ),
            ~exists().where(
                Shard.submission_id == Submission.id,
                Shard.run_token == Submission.claim_token,
                Shard.status == ShardStatus.RUNNING,
            ),
        )
    ).all()
    for submission_id, run_token in cancelled:
        lifecycle.cancel_run(session, _reaped_run(submission_id, run_token), now)

    overdue = and_(
        Shard.status == ShardStatus.QUEUED,
        or_(
            Shard.published_at.is_(None),
            Shard.published_at < now - timedelta(seconds=settings.republish_after_s),
        ),
        _running(Shard.submission_id, Shard.run_token),
    )
    ids = session.scalars(
        select(Shard.submission_id).where(overdue).group_by(Shard.submission_id)
    ).all()
    published = []
    for submission_id in ids:
        if _update(session, and_(Shard.submission_id == submission_id, overdue), published_at=now):
            published.append(submission_id)
    session.flush()
    return published


def _reaped_run(submission_id: str, run_token: str | None) -> Claim:
    """The claim of a run whose shards the reaper settles (the fence reads its token only)."""
    return Claim(submission_id, run_token or "", 0, "reaper")
