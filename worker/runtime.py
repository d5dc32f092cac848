"""What a worker process holds: its settings, its database engine, its storage (models, example
images, stored results) and its reaper thread.

Made in the process that uses them (Celery's ``worker_process_init``, or on first use), never
at import: an engine or a thread inherited through ``fork`` is not safe to use.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from celery import current_app
from celery.signals import worker_process_init, worker_process_shutdown

from config.settings import Settings, get_settings
from db.session import Database
from storage import Storage, storage_from_settings
from worker.queue import enqueue_evaluation
from worker.reaper import ReaperThread
from worker.sandbox import remove_abandoned_job_dirs

log = logging.getLogger(__name__)

__all__ = ["Runtime", "get_runtime"]


@dataclass
class Runtime:
    settings: Settings
    database: Database
    storage: Storage
    pid: int
    reaper: ReaperThread | None = None


_runtime: Runtime | None = None


def _app_settings() -> Settings:
    settings = getattr(current_app, "settings", None)
    return settings if isinstance(settings, Settings) else get_settings()


def get_runtime() -> Runtime:
    """This process's runtime, made on first use in this process."""
    global _runtime
    if _runtime is None or _runtime.pid != os.getpid():
        settings = _app_settings()
        _runtime = Runtime(
            settings=settings,
            database=Database(settings),
            storage=storage_from_settings(settings),
            pid=os.getpid(),
        )
    return _runtime


def _forget_inherited_broker_engines() -> None:
    """kombu's SQLAlchemy transport caches engines on a class; after a fork their pooled
    connections belong to the parent (SQLite forbids sharing them), so start new pools."""
    try:
        from kombu.transport.sqlalchemy import Channel
    except ImportError:  # pragma: no cover - SQLAlchemy is a dependency
        return
    for engine, _sessions in Channel._engines.values():
        engine.dispose(close=False)


@worker_process_init.connect
def _start_process(**_: object) -> None:
    _forget_inherited_broker_engines()
    runtime = get_runtime()
    for path in remove_abandoned_job_dirs(runtime.settings.sandbox_tmp_dir):
        log.info("removed %s, left by a worker that died", path)
    app = current_app._get_current_object()
    runtime.reaper = ReaperThread(
        runtime.database.sessions,
        runtime.settings,
        publish=lambda submission_id: enqueue_evaluation(submission_id, celery=app),
    )
    runtime.reaper.start()
    log.info(
        "worker process %d ready (reaper every %.0f s)",
        runtime.pid,
        runtime.settings.reaper_interval_s,
    )


@worker_process_shutdown.connect
def _stop_process(**_: object) -> None:
    runtime = _runtime
    if runtime is None or runtime.pid != os.getpid():
        return
    if runtime.reaper is not None:
        runtime.reaper.stop()
    runtime.database.dispose()
