"""The reaper: stale running jobs go back to the queue, or fail after max_attempts."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from db.models import Submission, SubmissionStatus, utcnow
from spatialbench.settings import Settings
from tests.worker.helpers import ROOT, create_submission, settings_env, small_cnn_file
from worker.reaper import reap


def _running(
    sessions: sessionmaker[Session],
    settings: Settings,
    tmp_path: Path,
    heartbeat: datetime | None,
    attempts: int = 1,
    **kw: object,
) -> str:
    model = small_cnn_file(tmp_path / f"m{len(list(tmp_path.iterdir()))}.safetensors",
                           seed=len(list(tmp_path.iterdir())))  # fmt: skip
    with sessions.begin() as session:
        return create_submission(
            session, settings, model, status=SubmissionStatus.RUNNING, heartbeat_at=heartbeat,
            attempts=attempts, worker="dead:1", **kw,
        ).id  # fmt: skip


def _row(sessions: sessionmaker[Session], submission_id: str) -> Submission:
    with sessions() as session:
        row = session.get(Submission, submission_id)
        assert row is not None
        return row


def test_a_stale_job_is_requeued_and_a_fresh_one_left_alone(
    sessions: sessionmaker[Session], settings: Settings, tmp_path: Path
) -> None:
    now = utcnow()
    timeout = timedelta(seconds=settings.heartbeat_timeout_s)
    stale = _running(sessions, settings, tmp_path, now - timeout - timedelta(seconds=1))
    fresh = _running(sessions, settings, tmp_path, now - timeout / 2)
    with sessions.begin() as session:
        assert reap(session, now, settings) == [stale]
    row = _row(sessions, stale)
    assert (row.status, row.worker, row.attempts) == (SubmissionStatus.QUEUED, None, 1)
    assert "stopped responding" in (row.message or "")
    assert _row(sessions, fresh).status is SubmissionStatus.RUNNING
    # Reaping again finds nothing: the job is queued now.
    with sessions.begin() as session:
        assert reap(session, now, settings) == []


def test_a_job_that_used_up_its_attempts_fails_with_an_explanation(
    sessions: sessionmaker[Session], settings: Settings, tmp_path: Path
) -> None:
    now = utcnow()
    sid = _running(sessions, settings, tmp_path, None, attempts=settings.max_attempts)
    with sessions.begin() as session:
        assert reap(session, now, settings) == []
    row = _row(sessions, sid)
    assert row.status is SubmissionStatus.FAILED
    assert f"started {settings.max_attempts} times" in (row.message or "")
    assert row.finished_at is not None


def test_a_stale_job_with_a_cancel_request_is_cancelled(
    sessions: sessionmaker[Session], settings: Settings, tmp_path: Path
) -> None:
    sid = _running(sessions, settings, tmp_path, None, cancel_requested=True)
    with sessions.begin() as session:
        assert reap(session, utcnow(), settings) == []
    assert _row(sessions, sid).status is SubmissionStatus.CANCELLED


def test_queued_jobs_without_a_message_are_sent_again_once(
    sessions: sessionmaker[Session], settings: Settings, tmp_path: Path
) -> None:
    now = utcnow()
    old = now - timedelta(seconds=settings.heartbeat_timeout_s + 1)
    model = small_cnn_file(tmp_path / "m.safetensors")
    with sessions.begin() as session:
        waiting = create_submission(session, settings, model, created_at=old).id
    with sessions.begin() as session:
        assert reap(session, now, settings) == []  # the broker may still hold its message
    with sessions.begin() as session:
        assert reap(session, now, settings, queue_empty=True) == [waiting]
    with sessions.begin() as session:
        assert reap(session, now, settings, queue_empty=True) == []
    assert _row(sessions, waiting).status is SubmissionStatus.QUEUED


# kombu's SQLAlchemy transport declares its relationships with the deprecated ``noload``.
@pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")
@pytest.mark.parametrize("backend", ["postgresql"])
def test_the_reap_command_requeues_through_the_broker(
    sessions: sessionmaker[Session], settings: Settings, tmp_path: Path
) -> None:
    sid = _running(sessions, settings, tmp_path, None)
    env = {**os.environ, **settings_env(settings)}
    done = subprocess.run(
        [sys.executable, "-c", "from spatialbench.cli import main; main()", "reap"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"requeued {sid}" in done.stdout
    assert _row(sessions, sid).status is SubmissionStatus.QUEUED
    # The message is in the (embedded) broker.
    from worker.app import create_celery
    from worker.queue import queue_is_empty

    assert not queue_is_empty(create_celery(settings))
