"""Findings 2 and 6: the database decides what runs next, the broker only delivers.

2. A queued job whose message was lost runs under steady arrivals (before the old code would
   re-send it: only once the queue was empty), and every job's message-less turn is covered
   by the reaper publishing it again.
6. A job whose worker died runs again in its old place, before jobs submitted after it.
"""

from __future__ import annotations

import os
import signal
import time
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from config.settings import Settings
from db import lifecycle
from db.models import SubmissionStatus, utcnow
from tests.faults.conftest import Api, Workers, row, wait_for_row
from tests.worker.helpers import create_model_submission, small_cnn_file, wait_for

pytestmark = [
    pytest.mark.timeout(600),
]

RUNNING, FINISHED = SubmissionStatus.RUNNING, SubmissionStatus.FINISHED
ARRIVALS = 4


def _children(pids: list[int]) -> list[int]:
    """Processes whose parent is one of ``pids`` (a worker's sandboxed evaluations)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) in pids:
            found.append(int(entry))
    return found


def test_a_lost_message_does_not_wait_behind_steady_arrivals(
    fault_settings: Settings,
    sessions: sessionmaker[Session],
    api: Api,
    workers: Workers,
    tmp_path: Path,
) -> None:
    settings = fault_settings.model_copy(update={"eval_limit": 20, "republish_after_s": 3.0})
    # Queued, but its message never reached the broker (a failed enqueue, a broker restart).
    with sessions.begin() as session:
        lost = create_model_submission(
            session, settings, small_cnn_file(tmp_path / "lost.st", seed=99)
        )
        lost_id = lost.id
        lifecycle.submit(session, lost, utcnow())

    def arrive() -> None:
        model = small_cnn_file(tmp_path / f"arrival{len(arrivals)}.st", seed=len(arrivals))
        arrivals.append(api.upload(model)["id"])

    # Jobs keep arriving, so the broker is never empty while the lost one waits (the old
    # reaper re-sent a lost job only once it was).
    arrivals: list[str] = []
    arrive()
    arrive()
    workers.start(settings)
    while len(arrivals) < ARRIVALS and not row(sessions, lost_id).status.is_final:
        arrive()
        time.sleep(2.0)
    done = wait_for_row(sessions, lost_id, lambda r: r.status.is_final, what="the lost job")
    assert done.status is FINISHED, done.message
    # It ran before the jobs that arrived after it.
    assert done.started_at is not None
    for sid in arrivals:
        started = row(sessions, sid).started_at
        assert started is None or done.started_at < started
    # One message ran the lost job, so one arrival is left without one: the reaper publishes
    # it again and everything finishes.
    for sid in arrivals:
        end = wait_for_row(sessions, sid, lambda r: r.status.is_final, what=f"arrival {sid}")
        assert end.status is FINISHED, end.message


def test_a_job_whose_worker_died_runs_again_before_later_jobs(
    fault_settings: Settings,
    sessions: sessionmaker[Session],
    api: Api,
    workers: Workers,
    trained_model: Path,
    tmp_path: Path,
) -> None:
    # The killed worker's message is gone with it, so one job is left without a message: the
    # reaper publishes it again.
    settings = fault_settings.model_copy(update={"eval_limit": 80, "republish_after_s": 5.0})
    first = workers.start(settings)
    sid = api.upload(trained_model)["id"]
    wait_for_row(sessions, sid, lambda r: r.status is RUNNING, what="the run to start")
    later = [api.upload(small_cnn_file(tmp_path / f"later{i}.st", seed=i))["id"] for i in range(2)]
    pool = first.pool_pids()
    sandboxes = _children(pool)
    first.kill()
    for pid in sandboxes:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    # Its heartbeat has stopped for longer than the timeout when the next worker looks.
    timeout = timedelta(seconds=settings.heartbeat_timeout_s + 1)
    wait_for(
        lambda: (beat := row(sessions, sid).heartbeat_at) is not None and utcnow() - beat > timeout,
        60,
        what="the heartbeat to go stale",
    )
    workers.start(settings)
    for submission_id in (sid, *later):
        end = wait_for_row(sessions, submission_id, lambda r: r.status.is_final)
        assert end.status is FINISHED, end.message
    again = row(sessions, sid)
    assert again.attempts == 2
    assert again.started_at is not None
    for submission_id in later:
        started = row(sessions, submission_id).started_at
        assert started is not None and again.started_at < started
