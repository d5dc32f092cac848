"""Evaluating submissions: claim one, cut it into shards, evaluate shards, record the outcome.

Every change of a submission's state goes through `db.lifecycle` (and a shard's through
`db.shards`), fenced by the claim's token: once a job has been reaped, resubmitted or claimed by
someone else, a late write from the old owner changes nothing, and the old owner stops its
sandbox.

- `run_next` (the task) first joins a running submission that still has a queued shard (work
  already started finishes first), else takes the oldest free job, whichever message brought it
  here; `run_submission` takes one job by id (or joins its run).
- A claimed job is cut into shards (`worker.sharded.plan_run`), and a message is published for
  each further shard so that other workers join; the shards run in the sandbox
  (`worker.sharded.run_shards`), and whoever finishes the last one records the merged result.
- A result stored earlier with the same configuration (`worker.results`) is recorded instead
  of evaluating again.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from config.settings import Settings
from db import lifecycle
from db import shards as shard_states
from db.lifecycle import Claim, JobConfig, RunState
from db.models import Submission, SubmissionStatus, utcnow
from db.session import transaction
from db.shards import ShardClaim
from storage import Storage, storage_from_settings
from worker.recording import (
    DATABASE_DOWN,
    DatabaseUnavailable,
    Outcome,
    evaluation_from_result,
    record_cancelled,
    record_failure,
    record_stored,
    retrying,
    wait_for_database,
)
from worker.results import find_stored
from worker.sharded import Publish, images_to_evaluate, plan_run, run_shards
from worker.sizing import SizingError, SizingStopped

log = logging.getLogger(__name__)

__all__ = [
    "DatabaseUnavailable",
    "Outcome",
    "evaluation_from_result",
    "run_next",
    "run_submission",
    "wait_for_database",
    "worker_name",
]


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def run_next(
    sessions: sessionmaker[Session],
    settings: Settings,
    *,
    storage: Storage | None = None,
    worker: str | None = None,
    publish: Publish | None = None,
    time_limit_errors: tuple[type[BaseException], ...] = (),
) -> Outcome:
    """Evaluate a queued shard of a running submission, else the oldest free job (see
    `db.lifecycle.claim_next`). ``storage``: the process's (`worker.runtime`); by default one
    made from ``settings``. ``publish`` hands a submission id to the broker (one message per
    further shard of a job this worker cuts)."""
    worker = worker or worker_name()
    storage = storage or storage_from_settings(settings)

    return _join_or_claim(
        sessions,
        settings,
        storage,
        lambda session: shard_states.claim_next_shard(session, worker, utcnow(), settings),
        lambda session: lifecycle.claim_next(session, worker, utcnow(), settings),
        publish,
        time_limit_errors,
    )


def run_submission(
    sessions: sessionmaker[Session],
    submission_id: str,
    settings: Settings,
    *,
    storage: Storage | None = None,
    worker: str | None = None,
    publish: Publish | None = None,
    time_limit_errors: tuple[type[BaseException], ...] = (),
) -> Outcome:
    """Evaluate the submission ``submission_id`` if it is free to run, or take a queued shard
    of its run if it is running."""
    worker = worker or worker_name()
    storage = storage or storage_from_settings(settings)

    def join(session: Session) -> ShardClaim | None:
        token = session.scalar(
            select(Submission.claim_token).where(
                Submission.id == submission_id, Submission.status == SubmissionStatus.RUNNING
            )
        )
        if token is None:
            return None
        return shard_states.claim_shard(session, submission_id, token, worker, utcnow(), settings)

    return _join_or_claim(
        sessions,
        settings,
        storage,
        join,
        lambda session: lifecycle.claim(session, submission_id, worker, utcnow(), settings),
        publish,
        time_limit_errors,
    )


def _join_or_claim(
    sessions: sessionmaker[Session],
    settings: Settings,
    storage: Storage,
    join: Callable[[Session], ShardClaim | None],
    take: Callable[[Session], Claim | None],
    publish: Publish | None,
    time_limit_errors: tuple[type[BaseException], ...],
) -> Outcome:
    """Evaluate the shard ``join`` takes of a running job, else the job ``take`` claims."""

    def join_run() -> ShardClaim | None:
        with transaction(sessions) as session:
            return join(session)

    shard = retrying(settings)(join_run)
    if shard is not None:
        return run_shards(sessions, settings, storage, shard, time_limit_errors=time_limit_errors)
    return _run(sessions, settings, storage, take, publish, time_limit_errors)


def _run(
    sessions: sessionmaker[Session],
    settings: Settings,
    storage: Storage,
    take: Callable[[Session], Claim | None],
    publish: Publish | None,
    time_limit_errors: tuple[type[BaseException], ...],
) -> Outcome:
    """Claim with ``take``, then record a stored result, or cut the job into shards and
    evaluate them.

    ``time_limit_errors`` are exceptions that mean "the task's time is up" (Celery's soft
    limit); they fail the job with a message rather than propagate.
    """

    def claim_job() -> tuple[Claim, Submission, JobConfig] | None:
        with transaction(sessions) as session:
            claim = take(session)
            submission = session.get(Submission, claim.submission_id) if claim else None
            if claim is None or submission is None:
                return None
            return claim, submission, JobConfig.of(submission, settings.eval_limit)

    # The database may go away between the task's check and the claim: wait for it again.
    claimed = retrying(settings)(claim_job)
    if claimed is None:
        return Outcome.SKIPPED
    claim, submission, config = claimed
    stored = find_stored(storage, claim.submission_id, config)
    if stored is not None:
        log.info(
            "recording the stored result of %s (computed under claim %s) instead of "
            "evaluating again",
            claim.submission_id,
            stored.claim_token,
        )
        return record_stored(sessions, claim, settings, storage, stored)
    log.info("evaluating %s (attempt %d) on %s", claim.submission_id, claim.attempt, claim.worker)
    heartbeat = _Heartbeat(sessions, claim, settings)
    try:
        images = images_to_evaluate(submission.benchmark, settings, heartbeat)
    except SizingStopped:
        if heartbeat.state is RunState.CANCEL:
            return record_cancelled(sessions, claim, settings)
        return Outcome.LOST
    except SizingError as exc:  # the operator's data or benchmark file; the user cannot fix it
        log.error("could not read the dataset of %s: %s", submission.benchmark, exc)
        return record_failure(
            sessions, claim, settings,
            f"The benchmark's dataset could not be read on the worker ({exc}); the operator "
            "has to fix it.",
        )  # fmt: skip
    if plan_run(sessions, settings, claim, images, publish) is None:
        return Outcome.LOST

    def take_first() -> ShardClaim | None:
        with transaction(sessions) as session:
            return shard_states.claim_shard(
                session, claim.submission_id, claim.token, claim.worker, utcnow(), settings
            )

    first = retrying(settings)(take_first)
    if first is None:
        # Other workers took every shard between the plan and now.
        return Outcome.SHARDS_DONE
    return run_shards(sessions, settings, storage, first, time_limit_errors=time_limit_errors)


class _Heartbeat:
    """The run's heartbeat while its job is being cut into shards (counting the images takes
    seconds); False, with ``state`` saying why, once the run is cancelled or lost."""

    def __init__(self, sessions: sessionmaker[Session], claim: Claim, settings: Settings) -> None:
        self.sessions = sessions
        self.claim = claim
        self.settings = settings
        self.state = RunState.CONTINUE

    def __call__(self) -> bool:
        try:
            with transaction(self.sessions) as session:
                self.state = lifecycle.heartbeat(session, self.claim, utcnow())
        except DATABASE_DOWN:
            log.warning("heartbeat for %s failed", self.claim.submission_id, exc_info=True)
        return self.state is RunState.CONTINUE
