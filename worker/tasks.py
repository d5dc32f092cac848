"""The Celery task: an id in, one service call, the outcome logged. The work is in
`worker.runner`, callable and testable without a broker."""

from __future__ import annotations

import logging

from celery import shared_task
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import select

from db.models import Submission
from db.session import transaction
from worker.app import EVALUATE_TASK
from worker.runner import Outcome, run_submission
from worker.runtime import get_runtime

log = logging.getLogger(__name__)


@shared_task(name=EVALUATE_TASK, ignore_result=True)
def evaluate_submission(submission_id: str) -> str:
    """Evaluate the submission ``submission_id`` unless it is final or running elsewhere.

    Safe to deliver twice: a finished or cancelled job returns at once, and a running job is
    taken over only when its heartbeat has stopped (see `worker.runner.claim_submission`).
    """
    runtime = get_runtime()
    with transaction(runtime.database.sessions) as session:
        status = session.scalar(select(Submission.status).where(Submission.id == submission_id))
    if status is None or status.is_final:
        log.info("submission %s: %s, nothing to do", submission_id, status or "not found")
        return Outcome.SKIPPED.value
    outcome = run_submission(
        runtime.database.sessions,
        submission_id,
        runtime.settings,
        time_limit_errors=(SoftTimeLimitExceeded,),
    )
    log.info("submission %s: %s", submission_id, outcome.value)
    return outcome.value
