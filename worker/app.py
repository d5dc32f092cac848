"""The Celery app: Redis as broker in production, kombu's SQLAlchemy transport embedded.

The database is the source of truth for every job, so there is no result backend. A task
message carries a submission id only and is acknowledged after the task has run
(``acks_late``), one at a time (prefetch 1), and given back to the queue if the process running
it dies (``reject_on_worker_lost``); Redis redelivers a message nobody acknowledged within the
visibility timeout, which is set above the hard time limit so a long evaluation is never handed
out twice while it runs.

``celery -A worker.app worker`` and ``spatialbench worker`` use `app`, made from the process's
settings; `create_celery` makes one from any settings (tests, the embedded server).
"""

from __future__ import annotations

from celery import Celery

from config.settings import Settings, get_settings
from worker.queue import EVALUATE_TASK, QUEUE, transport_options

__all__ = ["EVALUATE_TASK", "QUEUE", "app", "create_celery"]


def create_celery(settings: Settings) -> Celery:
    celery = Celery("spatialbench", broker=settings.broker_url, include=["worker.tasks"])
    celery.conf.update(
        task_default_queue=QUEUE,
        task_routes={EVALUATE_TASK: {"queue": QUEUE}},
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_soft_time_limit=settings.task_soft_time_limit_s,
        task_time_limit=settings.task_hard_time_limit_s,
        broker_transport_options=transport_options(settings),
        broker_connection_retry_on_startup=True,
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,
        result_backend=None,
        # A worker runs one evaluation at a time and holds nothing else.
        worker_concurrency=1,
        worker_max_tasks_per_child=100,
        worker_send_task_events=False,
        task_send_sent_event=False,
        enable_utc=True,
    )
    celery.settings = settings
    # The per-process setup (database engine, reaper) hangs on Celery's signals.
    import worker.runtime  # noqa: F401

    return celery


app = create_celery(get_settings())
