"""Finding 3: a database outage at the end of a run does not throw the run away.

The database is a PostgreSQL server of the test's own, stopped (``scripts/postgres.sh stop``)
while a run is under way and started again later on the same port.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from config.settings import Settings
from db.models import Evaluation, Shard, ShardStatus, SubmissionStatus
from storage import storage_from_settings
from storage.keys import shard_result_key, shards_prefix
from tests.faults.conftest import Api, PostgresServer, Workers, start_run, wait_for_row
from tests.worker.helpers import small_cnn_file, wait_for
from worker.results import results_prefix

pytestmark = [
    pytest.mark.timeout(600),
]

RUNNING, FINISHED = SubmissionStatus.RUNNING, SubmissionStatus.FINISHED
# Longer than the old code's five writes in 20 s.
OUTAGE_S = 25.0


@pytest.fixture
def database_url(own_postgres: PostgresServer) -> str:
    return own_postgres.url


def _evaluation(sessions: sessionmaker[Session], submission_id: str) -> Evaluation:
    with sessions() as session:
        return session.scalars(
            select(Evaluation).where(Evaluation.submission_id == submission_id)
        ).one()


def _sandbox_children_done(settings: Settings, submission_id: str) -> Path:
    """The job's one shard (120 images) stored its result: durable before any database write."""
    assert settings.storage_dir is not None  # the local backend: the worker's own folder
    stored = settings.storage_dir / shard_result_key(submission_id, 0)
    wait_for(stored.exists, 240, what="the finished shard to be stored")
    return stored


def test_a_result_finished_during_an_outage_is_recorded_when_the_database_is_back(
    fault_settings: Settings,
    sessions: sessionmaker[Session],
    api: Api,
    workers: Workers,
    trained_model: Path,
    own_postgres: PostgresServer,
) -> None:
    # No reaping in this test: the run that computed the result records it.
    settings = fault_settings.model_copy(update={"eval_limit": 120, "heartbeat_timeout_s": 600})
    run = start_run(api, workers, sessions, settings, trained_model, progress=0.3)
    sid, token = run.submission_id, run.token
    own_postgres.stop()
    try:
        stored = _sandbox_children_done(settings, sid)
        time.sleep(OUTAGE_S)
    finally:
        own_postgres.start()
    done = wait_for_row(sessions, sid, lambda r: r.status.is_final, timeout=120)
    assert done.status is FINISHED, done.message
    assert done.attempts == 1  # not evaluated again
    evaluation = _evaluation(sessions, sid)
    assert evaluation.job is not None
    assert evaluation.job["claim_token"] == evaluation.job["computed_under"] == token
    assert not stored.exists()


def test_a_worker_restarted_after_an_outage_records_the_stored_result_and_consumes_nothing_while_the_database_is_away(  # noqa: E501
    fault_settings: Settings,
    sessions: sessionmaker[Session],
    api: Api,
    workers: Workers,
    trained_model: Path,
    own_postgres: PostgresServer,
    tmp_path: Path,
) -> None:
    settings = fault_settings.model_copy(update={"eval_limit": 120})
    run = start_run(api, workers, sessions, settings, trained_model, progress=0.3)
    first, sid, token = run.worker, run.submission_id, run.token
    # Queued behind it, its message in the broker.
    other = api.upload(small_cnn_file(tmp_path / "other.safetensors", seed=3))["id"]
    own_postgres.stop()
    try:
        _sandbox_children_done(settings, sid)
        # The worker dies while it waits to record the result.
        os.killpg(first.proc.pid, signal.SIGKILL)
        first.proc.wait()
        second = workers.start(settings)
        # It takes the other job's message and waits for the database instead of failing it.
        wait_for(
            lambda: b"Retrying worker.recording._ping" in second.log_path.read_bytes(),
            60,
            what="the new worker to wait for the database",
        )
        time.sleep(5)
    finally:
        own_postgres.start()
    for submission_id in (sid, other):
        done = wait_for_row(sessions, submission_id, lambda r: r.status.is_final, timeout=240)
        assert done.status is FINISHED, done.message
    log = second.log_path.read_bytes()
    assert b"raised unexpected" not in log
    # The shard the first worker finished was handed on (its worker stopped) and taken as done
    # from its stored result, not evaluated again; the run itself stood.
    assert f"shard 0 of {sid}: its stored result is reused".encode() in log
    with sessions() as session:
        shard = session.scalars(select(Shard).where(Shard.submission_id == sid)).one()
    assert shard.attempts == 2 and shard.status is ShardStatus.DONE
    evaluation = _evaluation(sessions, sid)
    assert evaluation.job is not None
    assert evaluation.job["computed_under"] == token == evaluation.job["claim_token"]
    storage = storage_from_settings(settings)
    assert storage.list(results_prefix(sid)) == [] and storage.list(shards_prefix(sid)) == []
