"""Evaluating a submission: claim it, run the sandbox, store the result, record the outcome.

Every change of the submission's state goes through `db.lifecycle`, fenced by the claim's
token: once a job has been reaped, resubmitted or claimed by someone else, a late write from
the old owner changes nothing, and the old owner stops its sandbox.

- `run_next` (the task) takes the oldest free job, whichever message brought it here;
  `run_submission` takes one job by id.
- The evaluation runs in the sandbox; progress and the heartbeat are written at most every
  ``progress_interval_s``; a cancel request stops the sandbox within seconds.
- The model is fetched from the storage (`storage`: a local folder or S3) into a private
  folder of the job; the sandbox gets that local file and never the storage's credentials.
  Example images go back into the storage, where the pages read them.
- A finished result is written to the storage first (`worker.results`), then recorded
  with its configuration, retried with backoff while the database is away. A later claim with
  the same configuration records a stored result instead of evaluating again.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker
from tenacity import (
    Retrying,
    before_sleep_log,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential,
)

from config.settings import Settings
from db import lifecycle
from db.lifecycle import Claim, FinishOutcome, JobConfig, RunState
from db.models import Evaluation, Submission, utcnow
from db.session import transaction
from storage import (
    LocalStorage,
    ObjectNotFoundError,
    Storage,
    StorageError,
    example_key,
    model_key,
    storage_from_settings,
)
from worker.results import StoredResult, find_stored, forget_stored, store_result
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
    "DatabaseUnavailable",
    "Outcome",
    "evaluation_from_result",
    "run_next",
    "run_submission",
    "sandbox_deadline",
    "wait_for_database",
    "worker_name",
]

# What an unreachable (stopped, restarting, unreachable) database raises.
DATABASE_DOWN = (OperationalError, InterfaceError)
# Backoff while the database is away: 0.5 s doubling up to this.
MAX_BACKOFF_S = 15.0


class Outcome(StrEnum):
    FINISHED = "finished"
    FAILED = "failed"
    CANCELLED = "cancelled"
    # Not ours to run: already final, running elsewhere, or missing.
    SKIPPED = "skipped"
    # Taken away mid-run (reaped, resubmitted, or claimed by another worker); nothing was
    # recorded.
    LOST = "lost"


class DatabaseUnavailable(Exception):
    """The database stayed unreachable for ``database_wait_s``."""


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _retrying(settings: Settings) -> Retrying:
    """Retries a database write with backoff until the database is back (within
    ``database_wait_s``)."""
    return Retrying(
        retry=retry_if_exception_type(DATABASE_DOWN),
        wait=wait_exponential(multiplier=0.5, max=MAX_BACKOFF_S),
        stop=stop_after_delay(settings.database_wait_s),
        before_sleep=before_sleep_log(log, logging.WARNING),
        reraise=True,
    )


def _ping(sessions: sessionmaker[Session]) -> None:
    with sessions() as session:
        session.execute(text("SELECT 1"))


def wait_for_database(sessions: sessionmaker[Session], settings: Settings) -> None:
    """Return once the database answers; `DatabaseUnavailable` after ``database_wait_s``.

    The task calls it before taking anything, so a message is not consumed (claimed, failed
    or dropped) while the database is away: the worker holds it, unacknowledged, and waits.
    """
    try:
        _retrying(settings)(_ping, sessions)
    except DATABASE_DOWN as exc:
        raise DatabaseUnavailable(str(exc)) from exc


def sandbox_deadline(settings: Settings) -> float:
    """The sandbox's wall-clock limit: the setting, else a minute under the soft time limit
    (so the sandbox, not Celery, stops a slow evaluation and the message says why)."""
    if settings.sandbox_deadline_s is not None:
        return settings.sandbox_deadline_s
    soft = settings.task_soft_time_limit_s
    return max(soft - 60.0, soft * 0.9)


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
        progress = _progress_values(self.latest) if self.latest is not None else None
        try:
            with transaction(self.sessions) as session:
                state = lifecycle.heartbeat(session, self.claim, utcnow(), progress)
        except Exception:
            # The database is away: keep evaluating. If it stays away past the heartbeat
            # timeout, the reaper hands the job on and the next write here finds it lost.
            log.warning("progress write for %s failed", self.claim.submission_id, exc_info=True)
            return False
        self.lost = state is RunState.LOST
        self.cancelled = state is RunState.CANCEL
        return state is not RunState.CONTINUE


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


def _job(submission: Submission, settings: Settings, model_path: Path) -> SandboxJob:
    return SandboxJob(
        model_path=model_path,
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
        tmp_dir=settings.sandbox_tmp_dir,
    )


def run_next(
    sessions: sessionmaker[Session],
    settings: Settings,
    *,
    storage: Storage | None = None,
    worker: str | None = None,
    time_limit_errors: tuple[type[BaseException], ...] = (),
) -> Outcome:
    """Evaluate the oldest free job, if there is one (see `db.lifecycle.claim_next`).
    ``storage``: the process's (`worker.runtime`); by default one made from ``settings``."""
    worker = worker or worker_name()
    return _run(
        sessions,
        settings,
        storage or storage_from_settings(settings),
        lambda session: lifecycle.claim_next(session, worker, utcnow(), settings),
        time_limit_errors,
    )


def run_submission(
    sessions: sessionmaker[Session],
    submission_id: str,
    settings: Settings,
    *,
    storage: Storage | None = None,
    worker: str | None = None,
    time_limit_errors: tuple[type[BaseException], ...] = (),
) -> Outcome:
    """Evaluate the submission ``submission_id`` if it is free to run."""
    worker = worker or worker_name()
    return _run(
        sessions,
        settings,
        storage or storage_from_settings(settings),
        lambda session: lifecycle.claim(session, submission_id, worker, utcnow(), settings),
        time_limit_errors,
    )


def _run(
    sessions: sessionmaker[Session],
    settings: Settings,
    storage: Storage,
    take: Callable[[Session], Claim | None],
    time_limit_errors: tuple[type[BaseException], ...],
) -> Outcome:
    """Claim with ``take``, then evaluate (or record a stored result).

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
    claimed = _retrying(settings)(claim_job)
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
        return _record_stored(sessions, claim, settings, storage, stored)
    log.info("evaluating %s (attempt %d) on %s", claim.submission_id, claim.attempt, claim.worker)
    with _local_model(storage, submission.file_sha256, settings) as model_path:
        if model_path is None:
            return _record_failure(
                sessions,
                claim,
                settings,
                "The uploaded model file is missing from the worker's storage; upload it again.",
            )
        job = _job(submission, settings, model_path)
        return _evaluate(sessions, claim, settings, storage, config, job, time_limit_errors)


@contextmanager
def _local_model(storage: Storage, sha256: str, settings: Settings) -> Iterator[Path | None]:
    """The model as a local file for the sandbox (None when the storage has no such object).

    The local backend's file is used where it lies (the sandbox copies it into its own folder
    anyway); any other backend's object is fetched into a folder only this process may enter,
    removed afterwards.
    """
    key = model_key(sha256)
    if isinstance(storage, LocalStorage):
        path = storage.path(key)
        yield path if path.is_file() else None
        return
    folder = Path(tempfile.mkdtemp(prefix="spatialbench-model-", dir=settings.sandbox_tmp_dir))
    try:
        os.chmod(folder, 0o700)
        try:
            path = storage.fetch(key, folder / "model")
        except ObjectNotFoundError:
            yield None
            return
        yield path
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _evaluate(
    sessions: sessionmaker[Session],
    claim: Claim,
    settings: Settings,
    storage: Storage,
    config: JobConfig,
    job: SandboxJob,
    time_limit_errors: tuple[type[BaseException], ...],
) -> Outcome:
    """Run ``job`` in the sandbox and record what comes of it."""
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
            log.warning("lost %s to a resubmit, another worker or the reaper", claim.submission_id)
            return Outcome.LOST
        return _record_cancelled(sessions, claim, settings)
    except SandboxFailure as failure:
        log.info(
            "evaluation of %s failed (%s): %s", claim.submission_id, failure.kind, failure.detail
        )
        return _record_failure(sessions, claim, settings, failure.message)
    except time_limit_errors:
        return _record_failure(
            sessions,
            claim,
            settings,
            "The evaluation did not finish within the worker's time limit and was stopped. "
            "Make the model faster, or ask the operator for a longer limit.",
        )
    try:
        return _record_output(sessions, claim, settings, storage, config, output)
    finally:
        if output.examples_dir is not None:
            shutil.rmtree(output.examples_dir, ignore_errors=True)


def _record_failure(
    sessions: sessionmaker[Session], claim: Claim, settings: Settings, message: str
) -> Outcome:
    def write() -> bool:
        with transaction(sessions) as session:
            return lifecycle.fail(session, claim, message, utcnow())

    return Outcome.FAILED if _retrying(settings)(write) else Outcome.LOST


def _record_cancelled(sessions: sessionmaker[Session], claim: Claim, settings: Settings) -> Outcome:
    def write() -> bool:
        with transaction(sessions) as session:
            return lifecycle.cancel_run(session, claim, utcnow())

    return Outcome.CANCELLED if _retrying(settings)(write) else Outcome.LOST


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
            first_order=_first_order(metrics),
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
            config={
                **config,
                "benchmark": result.get("benchmark"),
                "ablation_results": result.get("ablations"),
            },
            cost={**cost, "forward_passes_by_phase": result.get("forward_passes")},
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise MalformedResult(str(exc)) from exc


def _first_order(metrics: dict[str, Any]) -> float | None:
    """The first-order attack's accuracy when the evaluation ran it (an optional metric)."""
    value = metrics.get("first_order")
    accuracy = _finite(value.get("accuracy")) if isinstance(value, dict) else None
    return accuracy if accuracy is not None and 0.0 <= accuracy <= 1.0 else None


def _store_examples(
    storage: Storage, submission_id: str, output: SandboxOutput
) -> list[dict[str, Any]]:
    """Put the checked PNGs into the storage (``examples/<id>/NAME.png``); the names in the
    metadata become those keys, which the pages serve."""
    if output.examples_dir is None or not output.examples:
        return []
    keys: dict[str, str] = {}
    for e in output.examples:
        for kind in ("original", "transformed"):
            file_name = e[kind]
            if file_name not in keys:
                keys[file_name] = example_key(submission_id, Path(file_name).stem)
                storage.put_file(keys[file_name], output.examples_dir / file_name)
    return [
        {**e, "original": keys[e["original"]], "transformed": keys[e["transformed"]]}
        for e in output.examples
    ]


def _record_output(
    sessions: sessionmaker[Session],
    claim: Claim,
    settings: Settings,
    storage: Storage,
    config: JobConfig,
    output: SandboxOutput,
) -> Outcome:
    """Store the result and its examples in the storage, then record it."""
    try:
        examples = _store_examples(storage, claim.submission_id, output)
    except (OSError, StorageError):
        log.exception("could not store the example images of %s", claim.submission_id)
        examples = []
    stored = store_result(
        storage, claim.submission_id, claim.token, config, output.result, examples
    )
    return _record_stored(sessions, claim, settings, storage, stored)


_FINISH_OUTCOMES = {
    FinishOutcome.FINISHED: Outcome.FINISHED,
    FinishOutcome.CANCELLED: Outcome.CANCELLED,
    FinishOutcome.LOST: Outcome.LOST,
}


def _record_stored(
    sessions: sessionmaker[Session],
    claim: Claim,
    settings: Settings,
    storage: Storage,
    stored: StoredResult,
) -> Outcome:
    """Record ``stored`` under ``claim``, retrying while the database is away. The stored file
    stays until the result is in the database (a worker that dies meanwhile loses nothing)."""
    try:
        outcome = _retrying(settings)(_write_result, sessions, claim, stored)
    except MalformedResult as exc:
        log.warning("malformed result for %s: %s", claim.submission_id, exc)
        forget_stored(storage, claim.submission_id)
        return _record_failure(
            sessions, claim, settings, "The evaluation process returned a malformed result."
        )
    if outcome is Outcome.FINISHED:
        forget_stored(storage, claim.submission_id)
    return outcome


def _write_result(sessions: sessionmaker[Session], claim: Claim, stored: StoredResult) -> Outcome:
    """The Evaluation row and ``status=finished``, in one transaction, or nothing."""
    with transaction(sessions) as session:
        submission = session.get(Submission, claim.submission_id)
        if submission is None:
            return Outcome.LOST
        evaluation = evaluation_from_result(submission, stored.result, stored.examples)
        outcome = lifecycle.finish(
            session,
            claim,
            evaluation,
            stored.job,
            utcnow(),
            computed_under=stored.claim_token,
        )
        if outcome is not FinishOutcome.FINISHED:
            session.expunge(evaluation)
    return _FINISH_OUTCOMES[outcome]
