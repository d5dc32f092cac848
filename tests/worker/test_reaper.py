"""The reaper: stale running jobs go back to the queue, or fail after max_attempts."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from config.settings import Settings
from db.lifecycle import reap
from db.models import Submission, SubmissionStatus, utcnow
from tests.worker.helpers import ROOT, create_model_submission, settings_env, small_cnn_file


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
        return create_model_submission(
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


def test_queued_jobs_are_published_again_oldest_first_whatever_the_broker_holds(
    sessions: sessionmaker[Session], settings: Settings, tmp_path: Path
) -> None:
    now = utcnow()
    overdue = now - timedelta(seconds=settings.republish_after_s + 1)
    ids = []
    for i, published in enumerate([overdue, now, overdue, None]):
        model = small_cnn_file(tmp_path / f"m{i}.safetensors", seed=i)
        with sessions.begin() as session:
            ids.append(
                create_model_submission(
                    session, settings, model, published_at=published,
                    queued_at=now - timedelta(seconds=100 - i),
                ).id
            )  # fmt: skip
    with sessions.begin() as session:
        assert reap(session, now, settings) == [ids[0], ids[2], ids[3]]
    with sessions.begin() as session:
        assert reap(session, now, settings) == []  # just published
    assert _row(sessions, ids[0]).status is SubmissionStatus.QUEUED


def test_a_requeued_job_keeps_its_place_in_the_queue(
    sessions: sessionmaker[Session], settings: Settings, tmp_path: Path
) -> None:
    now = utcnow()
    queued_at = now - timedelta(hours=1)
    sid = _running(sessions, settings, tmp_path, None, queued_at=queued_at)
    with sessions.begin() as session:
        assert reap(session, now, settings) == [sid]
    row = _row(sessions, sid)
    assert row.queued_at == queued_at
    assert row.claim_token is None


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
    assert f"published {sid}" in done.stdout
    assert _row(sessions, sid).status is SubmissionStatus.QUEUED
    # The message is in the (embedded) broker.
    from worker.app import create_celery
    from worker.queue import QUEUE

    with create_celery(settings).connection_for_write() as connection:
        assert connection.default_channel.queue_declare(QUEUE, passive=True)[1] == 1
