"""Handing work to the workers: the queue's names and a producer made from settings.

A leaf module (it imports nothing of ``worker``), so the API can publish without loading the
worker's Celery app, its signals or its tasks. A message carries a submission id, but it only
says "there is work": the worker takes the oldest queued job (``db.lifecycle.claim_next``).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from config.settings import Settings

if TYPE_CHECKING:
    from celery import Celery

__all__ = [
    "EVALUATE_TASK",
    "QUEUE",
    "Producer",
    "enqueue_evaluation",
    "transport_options",
]

QUEUE = "gpu"
EVALUATE_TASK = "spatialbench.evaluate_submission"
# How long past the hard time limit a message stays invisible before Redis hands it out again.
VISIBILITY_MARGIN_S = 600


def transport_options(settings: Settings) -> dict[str, Any]:
    broker = str(settings.broker_url)
    if broker.startswith(("sqla+", "sqlalchemy+")):
        # kombu hands these to create_engine: wait for SQLite's lock rather than fail. This
        # transport has no visibility timeout: a message a killed worker had taken is gone,
        # and the reaper publishes the job again.
        return {"connect_args": {"timeout": 30}}
    return {"visibility_timeout": settings.task_hard_time_limit_s + VISIBILITY_MARGIN_S}


def enqueue_evaluation(submission_id: str, *, celery: Celery) -> None:
    """Publish one evaluation message (an id only: the worker re-reads the database).

    Safe to call more than once for the same id: a worker runs a job only if it claims it.
    """
    celery.send_task(EVALUATE_TASK, args=[submission_id], queue=QUEUE)


class Producer:
    """Publishes evaluation messages to the broker of ``settings``; the API holds one.

    The Celery client is made on first use (connecting to nothing before), in the process
    that uses it, and is not registered as the process's current app.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._celery: Celery | None = None
        self._lock = threading.Lock()

    @property
    def celery(self) -> Celery:
        with self._lock:
            if self._celery is None:
                from celery import Celery

                celery = Celery("spatialbench-producer", set_as_current=False)
                celery.conf.update(
                    broker_url=self.settings.broker_url,
                    broker_transport_options=transport_options(self.settings),
                    broker_connection_retry_on_startup=True,
                    task_serializer="json",
                    accept_content=["json"],
                    task_default_queue=QUEUE,
                )
                self._celery = celery
            return self._celery

    def __call__(self, submission_id: str) -> None:
        enqueue_evaluation(submission_id, celery=self.celery)

    def close(self) -> None:
        with self._lock:
            if self._celery is not None:
                self._celery.close()
                self._celery = None
