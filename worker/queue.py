"""Handing a submission to the workers. The API calls `enqueue_evaluation` after its commit."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["enqueue_evaluation", "queue_is_empty"]


def enqueue_evaluation(submission_id: str, *, celery: Celery | None = None) -> None:
    """Queue the evaluation of ``submission_id`` (an id only: the worker re-reads the row).

    Safe to call more than once for the same id: the task runs a job only if it is free.
    """
    from worker.app import EVALUATE_TASK, QUEUE, app

    (celery or app).send_task(EVALUATE_TASK, args=[submission_id], queue=QUEUE)


def queue_is_empty(celery: Celery | None = None) -> bool:
    """Whether the broker holds no waiting message for the evaluation queue."""
    from kombu.exceptions import ChannelError

    from worker.app import QUEUE, app

    with (celery or app).connection_for_write() as connection:
        channel = connection.default_channel
        try:
            _name, count, _consumers = channel.queue_declare(QUEUE, passive=True)
        except ChannelError:  # Redis keeps no key for an empty list: no queue, no messages
            return True
        return int(count) == 0
