"""The Celery task: a message in, one service call, the outcome logged. The work is in
`worker.runner`, callable and testable without a broker."""

from __future__ import annotations

import logging

from celery import current_app, shared_task
from celery.exceptions import Reject, SoftTimeLimitExceeded

from worker.queue import EVALUATE_TASK, enqueue_evaluation
from worker.runner import DatabaseUnavailable, run_next, wait_for_database
from worker.runtime import get_runtime

log = logging.getLogger(__name__)


@shared_task(name=EVALUATE_TASK, ignore_result=True)
def evaluate_submission(submission_id: str) -> str:
    """Evaluate a queued shard of a running submission, else the oldest queued submission
    (``submission_id`` brought the message; the database decides the order, see
    `worker.runner.run_next`).

    Nothing is taken while the database is unreachable: the task waits for it, holding the
    message unacknowledged, and gives the message back if it stays away. Safe to deliver
    twice: a job runs only when this worker claims it.
    """
    runtime = get_runtime()
    try:
        wait_for_database(runtime.database.sessions, runtime.settings)
    except DatabaseUnavailable as exc:
        log.warning("database unreachable (%s); giving the message back", exc)
        raise Reject(str(exc), requeue=True) from exc
    app = current_app._get_current_object()
    outcome = run_next(
        runtime.database.sessions,
        runtime.settings,
        storage=runtime.storage,
        publish=lambda queued_id: enqueue_evaluation(queued_id, celery=app),
        time_limit_errors=(SoftTimeLimitExceeded,),
    )
    log.info("message for %s: %s", submission_id, outcome.value)
    return outcome.value
