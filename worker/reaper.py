"""The reaper: every worker runs `db.lifecycle.reap` on a timer and publishes what it returns.

Jobs whose worker stopped beating go back to the queue in their old place (or fail after
``max_attempts`` starts, or are cancelled if that was asked); queued jobs whose last publish
is older than ``republish_after_s`` are published again, oldest first, whatever the broker
holds. Running it in several places at once is safe: each row changes with a conditional
UPDATE that only one of them wins. ``spatialbench reap`` runs it once.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from sqlalchemy.orm import Session, sessionmaker

from config.settings import Settings
from db import lifecycle, shards
from db.models import utcnow
from db.session import transaction

log = logging.getLogger(__name__)

__all__ = ["ReaperThread", "reap_once"]


def reap_once(
    sessions: sessionmaker[Session], settings: Settings, publish: Callable[[str], None]
) -> list[str]:
    """`db.lifecycle.reap` and `db.shards.reap` in one transaction, then publish their ids
    (after the commit).

    A publish that fails is logged: the row's ``published_at`` says it was published, so the
    next round after ``republish_after_s`` tries again.
    """
    with transaction(sessions) as session:
        now = utcnow()
        ids = lifecycle.reap(session, now, settings)
        ids += [i for i in shards.reap(session, now, settings) if i not in ids]
    for submission_id in ids:
        try:
            publish(submission_id)
        except Exception:
            log.warning("reaper: could not publish %s", submission_id, exc_info=True)
            continue
        log.info("reaper: published %s", submission_id)
    return ids


class ReaperThread(threading.Thread):
    """Runs `reap_once` every ``reaper_interval_s`` in the worker process until stopped; a
    round that fails (the database away) is logged and the next one tries again."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        settings: Settings,
        publish: Callable[[str], None],
    ) -> None:
        super().__init__(name="spatialbench-reaper", daemon=True)
        self.sessions = sessions
        self.settings = settings
        self.publish = publish
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                reap_once(self.sessions, self.settings, self.publish)
            except Exception as exc:
                log.warning("reaper round failed: %s", exc)
            self.stopped.wait(self.settings.reaper_interval_s)

    def stop(self) -> None:
        self.stopped.set()
