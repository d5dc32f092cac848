"""Writing a run's outcome to the database: the retries while the database is away, the
`Evaluation` row made from a (checked) result, and the transitions that end a run.

Every write is fenced by the run's claim (`db.lifecycle`): a run that was reaped, resubmitted or
claimed by someone else changes nothing. A finished result is written to the storage first
(`worker.results`), then recorded, retried with backoff while the database is away.
"""

from __future__ import annotations

import logging
import math
from enum import StrEnum
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
from db.lifecycle import Claim, FinishOutcome
from db.models import Evaluation, Submission, utcnow
from db.session import transaction
from evaluator.vocabulary import BOARD_METRICS, MetricKey
from storage import Storage
from worker.results import StoredResult, forget_stored

log = logging.getLogger(__name__)

__all__ = [
    "DATABASE_DOWN",
    "DatabaseUnavailable",
    "MalformedResult",
    "Outcome",
    "evaluation_from_result",
    "finite",
    "record_cancelled",
    "record_failure",
    "record_stored",
    "retrying",
    "wait_for_database",
]


# What an unreachable (stopped, restarting, unreachable) database raises.
DATABASE_DOWN = (OperationalError, InterfaceError)
# Backoff while the database is away: 0.5 s doubling up to this.


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
    # This worker's shards are done and stored; others of the run are still running elsewhere,
    # and whoever finishes the last one records the result.
    SHARDS_DONE = "shards done"


class DatabaseUnavailable(Exception):
    """The database stayed unreachable for ``database_wait_s``."""


def retrying(settings: Settings) -> Retrying:
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
        retrying(settings)(_ping, sessions)
    except DATABASE_DOWN as exc:
        raise DatabaseUnavailable(str(exc)) from exc


def finite(value: Any, default: float | None = None) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return default
    return number if math.isfinite(number) else default


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
            acc = finite(value.get("accuracy"))
            if acc is not None and not 0.0 <= acc <= 1.0:
                raise MalformedResult(f"accuracy {key} = {acc}")
            return acc

        return Evaluation(
            submission_id=submission.id,
            benchmark=submission.benchmark,
            # The leaderboard's columns; first-order is optional, and absent when it did
            # not run.
            **{
                key.value: accuracy(key)
                for key in BOARD_METRICS
                if key is not MetricKey.FIRST_ORDER
            },
            first_order=_first_order(metrics),
            images=int(config["images"]),
            metrics=dict(metrics),
            landscape=result.get("landscape"),
            per_image=result.get("per_image"),
            examples=examples or None,
            forward_passes=int(cost["forward_passes"]),
            wall_time_s=finite(cost["wall_time_s"], 0.0) or 0.0,
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
    accuracy = finite(value.get("accuracy")) if isinstance(value, dict) else None
    return accuracy if accuracy is not None and 0.0 <= accuracy <= 1.0 else None


def record_failure(
    sessions: sessionmaker[Session], claim: Claim, settings: Settings, message: str
) -> Outcome:
    def write() -> bool:
        with transaction(sessions) as session:
            return lifecycle.fail(session, claim, message, utcnow())

    return Outcome.FAILED if retrying(settings)(write) else Outcome.LOST


def record_cancelled(sessions: sessionmaker[Session], claim: Claim, settings: Settings) -> Outcome:
    def write() -> bool:
        with transaction(sessions) as session:
            return lifecycle.cancel_run(session, claim, utcnow())

    return Outcome.CANCELLED if retrying(settings)(write) else Outcome.LOST


_FINISH_OUTCOMES = {
    FinishOutcome.FINISHED: Outcome.FINISHED,
    FinishOutcome.CANCELLED: Outcome.CANCELLED,
    FinishOutcome.LOST: Outcome.LOST,
}


def record_stored(
    sessions: sessionmaker[Session],
    claim: Claim,
    settings: Settings,
    storage: Storage,
    stored: StoredResult,
) -> Outcome:
    """Record ``stored`` under ``claim``, retrying while the database is away. The stored file
    stays until the result is in the database (a worker that dies meanwhile loses nothing)."""
    try:
        outcome = retrying(settings)(_write_result, sessions, claim, stored)
    except MalformedResult as exc:
        log.warning("malformed result for %s: %s", claim.submission_id, exc)
        forget_stored(storage, claim.submission_id)
        return record_failure(
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
