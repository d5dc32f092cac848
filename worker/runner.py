"""Evaluating one submission: claim it, run the sandbox, record progress and the outcome.

The database is the source of truth, so every write here is a conditional UPDATE fenced by the
attempt number this worker claimed: once a job has been reaped or claimed by someone else, a
late write from the old owner changes nothing, and the old owner stops its sandbox.

- `claim_submission` takes a queued job, or a running one whose heartbeat is stale, in one
  atomic ``UPDATE ... WHERE``, incrementing ``attempts``.
- `run_submission` runs the evaluation in the sandbox, writes progress and the heartbeat at
  most every ``progress_interval_s``, stops the sandbox within seconds of a cancel request,
  and writes the `Evaluation` row and ``status=finished`` in one transaction.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from db.models import Evaluation, Submission, SubmissionStatus, utcnow
from db.session import transaction
from spatialbench.settings import Environment, Settings
from worker.sandbox import (
    SandboxFailure,
    SandboxJob,
    SandboxLimits,
    SandboxOutput,
    SandboxStopped,
    run_sandboxed,
)

log = logging.getLogger(__name__)

__all__ = [
    "Claim",
    "Outcome",
    "claim_submission",
    "evaluation_from_result",
    "run_submission",
    "sandbox_deadline",
    "worker_name",
]

# Tries, and the wait between them, for the final write when the database is briefly away.
FINAL_WRITE_TRIES = 5
FINAL_WRITE_BACKOFF_S = 2.0


class Outcome(StrEnum):
    FINISHED = "finished"
    FAILED = "failed"
    CANCELLED = "cancelled"
    # Not ours to run: already final, running elsewhere, or missing.
    SKIPPED = "skipped"
    # Taken away mid-run (reaped, or claimed by another worker); nothing was recorded.
    LOST = "lost"


@dataclass(frozen=True)
class Claim:
    submission_id: str
    attempt: int
    worker: str


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def examples_dir(settings: Settings, submission_id: str) -> Path:
    assert settings.storage_dir is not None
    return settings.storage_dir / "examples" / submission_id


def sandbox_deadline(settings: Settings) -> float:
    """The sandbox's wall-clock limit: the setting, else a minute under the soft time limit
    (so the sandbox, not Celery, stops a slow evaluation and the message says why)."""
    if settings.sandbox_deadline_s is not None:
        return settings.sandbox_deadline_s
    soft = settings.task_soft_time_limit_s
    return max(soft - 60.0, soft * 0.9)


def _fence(claim: Claim) -> Any:
    return and_(
        Submission.id == claim.submission_id,
        Submission.attempts == claim.attempt,
        Submission.status == SubmissionStatus.RUNNING,
    )


def _update(session: Session, where: Any, **values: Any) -> int:
    result = session.execute(
        update(Submission)
        .where(where)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


# --- Claiming ---------------------------------------------------------------------------------


def claim_submission(
    session: Session, submission_id: str, worker: str, now: datetime, settings: Settings
) -> Claim | None:
    """Take the job if it is free: queued, or running with a heartbeat older than
    ``heartbeat_timeout_s`` (its worker died), and fewer than ``max_attempts`` tries so far.

    Returns None when it is not free. Also settles two cases on the way: a free job that has
    used up its attempts fails, and a queued job whose cancel was requested is cancelled.
    Flushes, never commits.
    """
    stale = now - timedelta(seconds=settings.heartbeat_timeout_s)
    free = and_(
        Submission.id == submission_id,
        Submission.cancel_requested.is_(False),
        or_(
            Submission.status == SubmissionStatus.QUEUED,
            and_(
                Submission.status == SubmissionStatus.RUNNING,
                or_(Submission.heartbeat_at.is_(None), Submission.heartbeat_at < stale),
            ),
        ),
    )
    claimed = _update(
        session,
        and_(free, Submission.attempts < settings.max_attempts),
        status=SubmissionStatus.RUNNING,
        attempts=Submission.attempts + 1,
        worker=worker,
        heartbeat_at=now,
        started_at=now,
        finished_at=None,
        phase="starting",
        progress=0.0,
        forward_passes=0,
        eta_seconds=None,
        message=None,
    )
    if claimed:
        attempt = session.scalar(select(Submission.attempts).where(Submission.id == submission_id))
        assert attempt is not None
        return Claim(submission_id, attempt, worker)
    _update(
        session,
        and_(free, Submission.attempts >= settings.max_attempts),
        status=SubmissionStatus.FAILED,
        finished_at=now,
        eta_seconds=None,
        message=give_up_message(settings),
    )
    _update(
        session,
        and_(
            Submission.id == submission_id,
            Submission.cancel_requested.is_(True),
            Submission.status == SubmissionStatus.QUEUED,
        ),
        status=SubmissionStatus.CANCELLED,
        finished_at=now,
        eta_seconds=None,
        message="Cancelled before it started.",
    )
    return None


def give_up_message(settings: Settings) -> str:
    return (
        f"The evaluation was started {settings.max_attempts} times and each time its worker "
        "stopped responding (crashed, killed or lost its connection), so it was given up. "
        "This is usually the machine running out of memory: a smaller model or one that uses "
        "less memory per image may fit; otherwise contact the operator."
    )


# --- Running ----------------------------------------------------------------------------------


class _Progress:
    """What to write at the next heartbeat, and the cancel/lost check."""

    def __init__(self, sessions: sessionmaker[Session], claim: Claim, settings: Settings) -> None:
        self.sessions = sessions
        self.claim = claim
        self.settings = settings
        self.latest: dict[str, Any] | None = None
        self.last_write = 0.0
        self.cancelled = False
        self.lost = False

    def on_progress(self, message: dict[str, Any]) -> None:
        self.latest = message

    def tick(self) -> bool:
        """Heartbeat and progress, at most every ``progress_interval_s``; True means stop."""
        now = time.monotonic()
        if now - self.last_write < self.settings.progress_interval_s:
            return False
        self.last_write = now
        values: dict[str, Any] = {"heartbeat_at": utcnow()}
        if self.latest is not None:
            values.update(_progress_values(self.latest))
        try:
            with transaction(self.sessions) as session:
                if not _update(session, _fence(self.claim), **values):
                    self.lost = True
                    return True
                self.cancelled = bool(
                    session.scalar(
                        select(Submission.cancel_requested).where(
                            Submission.id == self.claim.submission_id
                        )
                    )
                )
        except Exception:
            # The database is away: keep evaluating. If it stays away past the heartbeat
            # timeout, the reaper hands the job on and the next write here finds it lost.
            log.warning("progress write for %s failed", self.claim.submission_id, exc_info=True)
            return False
        return self.cancelled


def _finite(value: Any, default: float | None = None) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return default
    return number if math.isfinite(number) else default


def _progress_values(message: dict[str, Any]) -> dict[str, Any]:
    fraction = _finite(message.get("fraction"), 0.0) or 0.0
    values: dict[str, Any] = {
        "phase": str(message.get("phase", ""))[:32] or None,
        "progress": min(max(fraction, 0.0), 0.999),
        "eta_seconds": _finite(message.get("eta_s")),
    }
    passes = message.get("forward_passes")
    if isinstance(passes, int) and passes >= 0:
        values["forward_passes"] = passes
    return values


def _job(submission: Submission, settings: Settings) -> SandboxJob:
    return SandboxJob(
        model_path=settings.model_path(submission.file_sha256),
        model_format=submission.model_format.value,
        benchmark=submission.benchmark,
        architecture=submission.architecture,
        mean=submission.mean,
        std=submission.std,
        # The sandbox runs in a folder of its own: relative paths would point into it.
        data_dir=settings.data_dir.resolve(),
        benchmarks_file=settings.benchmarks_file.resolve() if settings.benchmarks_file else None,
        device=settings.device,
        batch_size=settings.batch_size,
        bf16=settings.bf16,
        limit=settings.eval_limit,
        examples=settings.example_images,
    )


def sandbox_limits(settings: Settings) -> SandboxLimits:
    return SandboxLimits(
        deadline_s=sandbox_deadline(settings),
        memory_bytes=settings.sandbox_memory_bytes,
        threads=settings.sandbox_threads,
        user=settings.sandbox_user or None,
        require_user=settings.env is Environment.PRODUCTION,
        isolate_network=settings.sandbox_isolate_network,
        tmp_dir=settings.sandbox_tmp_dir,
    )


def run_submission(
    sessions: sessionmaker[Session],
    submission_id: str,
    settings: Settings,
    *,
    worker: str | None = None,
    time_limit_errors: tuple[type[BaseException], ...] = (),
    on_claim: Callable[[Claim], None] | None = None,
) -> Outcome:
    """Evaluate the submission if it is free to run; see the module doc.

    ``time_limit_errors`` are exceptions that mean "the task's time is up" (Celery's soft
    limit); they fail the job with a message rather than propagate.
    """
    worker = worker or worker_name()
    with transaction(sessions) as session:
        claim = claim_submission(session, submission_id, worker, utcnow(), settings)
        submission = session.get(Submission, submission_id) if claim else None
        job = _job(submission, settings) if submission is not None else None
    if claim is None or job is None:
        return Outcome.SKIPPED
    if on_claim is not None:
        on_claim(claim)
    log.info("evaluating %s (attempt %d) on %s", submission_id, claim.attempt, worker)
    if not job.model_path.is_file():
        return _record_failure(
            sessions,
            claim,
            "The uploaded model file is missing from the worker's storage; upload it again.",
        )
    progress = _Progress(sessions, claim, settings)
    try:
        output = run_sandboxed(
            job,
            sandbox_limits(settings),
            on_progress=progress.on_progress,
            tick=progress.tick,
            tick_interval_s=min(1.0, settings.progress_interval_s),
        )
    except SandboxStopped:
        if progress.lost:
            log.warning("lost %s to another worker or the reaper", submission_id)
            return Outcome.LOST
        return _record_cancelled(sessions, claim)
    except SandboxFailure as failure:
        log.info("evaluation of %s failed (%s): %s", submission_id, failure.kind, failure.detail)
        return _record_failure(sessions, claim, failure.message)
    except time_limit_errors:
        return _record_failure(
            sessions,
            claim,
            "The evaluation did not finish within the worker's time limit and was stopped. "
            "Make the model faster, or ask the operator for a longer limit.",
        )
    try:
        return _record_result(sessions, claim, settings, output)
    finally:
        if output.examples_dir is not None:
            shutil.rmtree(output.examples_dir, ignore_errors=True)


def _record_failure(sessions: sessionmaker[Session], claim: Claim, message: str) -> Outcome:
    with transaction(sessions) as session:
        now = utcnow()
        if _update(
            session,
            _fence(claim),
            status=SubmissionStatus.FAILED,
            message=message,
            finished_at=now,
            heartbeat_at=now,
            eta_seconds=None,
        ):
            return Outcome.FAILED
    return Outcome.LOST


def _record_cancelled(sessions: sessionmaker[Session], claim: Claim) -> Outcome:
    with transaction(sessions) as session:
        now = utcnow()
        if _update(
            session,
            _fence(claim),
            status=SubmissionStatus.CANCELLED,
            message="Cancelled by its owner while it was running.",
            finished_at=now,
            heartbeat_at=now,
            eta_seconds=None,
        ):
            return Outcome.CANCELLED
    return Outcome.LOST


class MalformedResult(ValueError):
    pass


def evaluation_from_result(
    submission: Submission, result: dict[str, Any], examples: list[dict[str, Any]]
) -> Evaluation:
    """The `Evaluation` row for an ``EvaluationResult.to_dict()`` (as the sandbox sent it, so
    checked rather than trusted)."""
    try:
        metrics = result["metrics"]
        cost = result["cost"]
        config = result["config"]

        def accuracy(key: str) -> float | None:
            value = metrics.get(key)
            if value is None:
                return None
            acc = _finite(value.get("accuracy"))
            if acc is not None and not 0.0 <= acc <= 1.0:
                raise MalformedResult(f"accuracy {key} = {acc}")
            return acc

        return Evaluation(
            submission_id=submission.id,
            benchmark=submission.benchmark,
            natural=accuracy("natural"),
            random=accuracy("random"),
            worst_of_k=accuracy("worst_of_k"),
            grid=accuracy("grid"),
            vote_natural=accuracy("vote_natural"),
            grid_vote=accuracy("grid_vote"),
            images=int(config["images"]),
            metrics=dict(metrics),
            landscape=result.get("landscape"),
            per_image=result.get("per_image"),
            examples=examples or None,
            forward_passes=int(cost["forward_passes"]),
            wall_time_s=_finite(cost["wall_time_s"], 0.0) or 0.0,
            device=str(cost["device"])[:200],
            precision=str(cost["precision"])[:16],
            seed=int(cost["seed"]),
            versions=dict(cost.get("versions") or {}),
            config={**config, "benchmark": result.get("benchmark")},
            cost={**cost, "forward_passes_by_phase": result.get("forward_passes")},
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise MalformedResult(str(exc)) from exc


def _store_examples(
    settings: Settings, submission_id: str, output: SandboxOutput
) -> list[dict[str, Any]]:
    """Move the checked PNGs to ``<storage_dir>/examples/<id>/``; paths in the metadata become
    relative to the storage folder."""
    if output.examples_dir is None or not output.examples:
        return []
    target = examples_dir(settings, submission_id)
    staging = target.with_name(target.name + ".new")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name in os.listdir(output.examples_dir):
        shutil.copyfile(output.examples_dir / name, staging / name)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    prefix = f"examples/{submission_id}/"
    return [
        {**e, "original": prefix + e["original"], "transformed": prefix + e["transformed"]}
        for e in output.examples
    ]


def _record_result(
    sessions: sessionmaker[Session], claim: Claim, settings: Settings, output: SandboxOutput
) -> Outcome:
    try:
        examples = _store_examples(settings, claim.submission_id, output)
    except OSError:
        log.exception("could not store the example images of %s", claim.submission_id)
        examples = []
    for attempt in range(FINAL_WRITE_TRIES):
        try:
            return _write_result(sessions, claim, output, examples)
        except MalformedResult as exc:
            log.warning("malformed result for %s: %s", claim.submission_id, exc)
            return _record_failure(
                sessions, claim, "The evaluation process returned a malformed result."
            )
        except Exception:
            if attempt == FINAL_WRITE_TRIES - 1:
                raise
            log.warning(
                "writing the result of %s failed; retrying", claim.submission_id, exc_info=True
            )
            time.sleep(FINAL_WRITE_BACKOFF_S * (attempt + 1))
    raise AssertionError("unreachable")


def _write_result(
    sessions: sessionmaker[Session],
    claim: Claim,
    output: SandboxOutput,
    examples: list[dict[str, Any]],
) -> Outcome:
    """The Evaluation row and ``status=finished``, in one transaction, or nothing."""
    with transaction(sessions) as session:
        now = utcnow()
        submission = session.get(Submission, claim.submission_id)
        if submission is None:
            return Outcome.LOST
        evaluation = evaluation_from_result(submission, output.result, examples)
        done = _update(
            session,
            and_(_fence(claim), Submission.cancel_requested.is_(False)),
            status=SubmissionStatus.FINISHED,
            phase="done",
            progress=1.0,
            forward_passes=evaluation.forward_passes,
            eta_seconds=0.0,
            message=None,
            finished_at=now,
            heartbeat_at=now,
        )
        cancelled = False
        if done:
            # A row left by an earlier attempt cannot exist (it would have finished the job),
            # but a unique violation must not be how we find out.
            old = session.scalar(
                select(Evaluation).where(Evaluation.submission_id == claim.submission_id)
            )
            if old is not None:
                session.delete(old)
                session.flush()
            session.add(evaluation)
        else:
            cancelled = bool(
                session.scalar(
                    select(Submission.cancel_requested).where(Submission.id == claim.submission_id)
                )
            )
    if done:
        return Outcome.FINISHED
    return _record_cancelled(sessions, claim) if cancelled else Outcome.LOST
