"""End to end: a real Redis broker, real `spatialbench worker` processes, a SQLite database.

The test process plays the API: it writes the submission row, enqueues the id after the
commit, and follows the row; the worker does the rest.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from config.settings import Settings
from db.models import Evaluation, Shard, Submission, SubmissionStatus
from evaluator.models.loading import ModelFormat
from tests.worker.helpers import (
    WorkerProcess,
    create_model_submission,
    export_file,
    quick_accuracies,
    wait_for,
)
from worker.app import create_celery
from worker.queue import enqueue_evaluation

# Production's parts: Postgres and Redis (the serve test runs SQLite and the embedded broker).
pytestmark = [pytest.mark.timeout(600), pytest.mark.parametrize("backend", ["postgresql"])]


@pytest.fixture
def e2e_settings(settings: Settings, clean_redis: str) -> Settings:
    return settings.model_copy(
        update={
            "broker_url": clean_redis,
            "heartbeat_timeout_s": 4.0,
            "reaper_interval_s": 1.0,
            "task_soft_time_limit_s": 300,
            "task_hard_time_limit_s": 360,
        }
    )


@pytest.fixture
def workers(e2e_settings: Settings, tmp_path: Path) -> Iterator[list[WorkerProcess]]:
    """Started workers, stopped (or killed) at the end; start one with `_start`."""
    started: list[WorkerProcess] = []
    yield started
    for worker in started:
        worker.stop()


def _start(workers: list[WorkerProcess], settings: Settings, tmp_path: Path) -> WorkerProcess:
    worker = WorkerProcess(
        settings, tmp_path / f"worker{len(workers) + 1}.log", name=f"w{len(workers) + 1}"
    )
    workers.append(worker)
    worker.wait_ready()
    return worker


def _submit(sessions: sessionmaker[Session], settings: Settings, model: Path, **kw: object) -> str:
    with sessions.begin() as session:
        submission_id = create_model_submission(session, settings, model, **kw).id
    enqueue_evaluation(submission_id, celery=create_celery(settings))
    return submission_id


def _row(sessions: sessionmaker[Session], submission_id: str) -> Submission:
    with sessions() as session:
        row = session.get(Submission, submission_id)
        assert row is not None
        return row


def _sandbox_pids(worker: WorkerProcess) -> list[int]:
    """Sandboxed evaluation processes started by this worker's pool."""
    found = []
    pool = set(worker.pool_pids())
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if b"worker.evaluator_process" in cmdline and ppid in pool:
            found.append(int(entry))
    return found


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_a_worker_evaluates_a_submission_and_a_second_delivery_changes_nothing(
    e2e_settings: Settings,
    sessions: sessionmaker[Session],
    trained_model: Path,
    workers: list[WorkerProcess],
    tmp_path: Path,
) -> None:
    settings = e2e_settings.model_copy(update={"eval_limit": 40})
    worker = _start(workers, settings, tmp_path)
    submission_id = _submit(sessions, settings, trained_model)
    expected = quick_accuracies(settings, trained_model, limit=40)

    progress_seen: set[float] = set()

    def finished() -> bool:
        row = _row(sessions, submission_id)
        progress_seen.add(row.progress)
        assert row.status not in (SubmissionStatus.FAILED, SubmissionStatus.CANCELLED), (
            row.message,
            worker.log_path.read_text(),
        )
        return row.status is SubmissionStatus.FINISHED

    wait_for(finished, 240, what="the submission to finish")
    row = _row(sessions, submission_id)
    assert row.attempts == 1 and row.progress == 1.0 and row.phase == "done"
    assert row.forward_passes > 0 and row.started_at and row.finished_at
    with sessions() as session:
        evaluation = session.scalars(select(Evaluation)).one()
    assert {k: v["accuracy"] for k, v in evaluation.metrics.items()} == expected
    assert evaluation.grid == expected["grid"]

    # The same message again (a redelivery, or the API enqueueing twice).
    enqueue_evaluation(submission_id, celery=create_celery(settings))
    wait_for(
        lambda: worker.log_path.read_text().count("succeeded in") >= 2,
        60,
        what="the second delivery to be handled",
    )
    again = _row(sessions, submission_id)
    assert (again.status, again.attempts, again.finished_at, again.worker) == (
        SubmissionStatus.FINISHED,
        1,
        row.finished_at,
        row.worker,
    )
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Evaluation)) == 1
        assert session.scalars(select(Evaluation)).one().id == evaluation.id


def test_cancel_stops_a_running_evaluation_within_seconds(
    e2e_settings: Settings,
    sessions: sessionmaker[Session],
    workers: list[WorkerProcess],
    tmp_path: Path,
) -> None:
    worker = _start(workers, e2e_settings, tmp_path)
    model = export_file(tmp_path / "slow.pt2", "slow")
    submission_id = _submit(
        sessions,
        e2e_settings,
        model,
        model_format=ModelFormat.EXPORT,
        architecture=None,
        benchmark="digits",
    )
    sandbox = wait_for(lambda: _sandbox_pids(worker), 120, what="the sandbox to start")
    assert _row(sessions, submission_id).status is SubmissionStatus.RUNNING

    with sessions.begin() as session:  # what POST /submissions/{id}/cancel does
        session.execute(
            update(Submission).where(Submission.id == submission_id).values(cancel_requested=True)
        )
    # The worker checks for a cancel at every heartbeat; the bound is the test's patience, not
    # a speed figure.
    wait_for(
        lambda: _row(sessions, submission_id).status is SubmissionStatus.CANCELLED,
        30,
        0.1,
        what="the job to be cancelled",
    )
    assert not any(_alive(pid) for pid in sandbox)
    row = _row(sessions, submission_id)
    assert row.finished_at is not None and "Cancelled" in (row.message or "")
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Evaluation)) == 0


def test_a_job_whose_worker_was_killed_is_finished_by_another_worker(
    e2e_settings: Settings,
    sessions: sessionmaker[Session],
    trained_model: Path,
    workers: list[WorkerProcess],
    tmp_path: Path,
) -> None:
    settings = e2e_settings.model_copy(update={"eval_limit": 200})
    first = _start(workers, settings, tmp_path)
    submission_id = _submit(sessions, settings, trained_model)
    wait_for(
        lambda: _row(sessions, submission_id).progress > 0,
        120,
        0.1,
        what="the evaluation to make progress",
    )
    sandbox = _sandbox_pids(first)
    assert sandbox
    first.pool_pid = first.pool_pids()[0]
    first_owner = _row(sessions, submission_id).worker
    first.kill()  # SIGKILL, main process and pool alike
    # The sandbox dies with the pool process that started it.
    wait_for(lambda: not any(_alive(pid) for pid in sandbox), 10, what="the sandbox to die")
    assert _row(sessions, submission_id).status is SubmissionStatus.RUNNING

    left = list(Path(tempfile.gettempdir()).glob(f"spatialbench-job-{first.pool_pid}-*"))
    assert left  # a killed worker cannot clean up after itself

    second = _start(workers, settings, tmp_path)
    wait_for(
        lambda: _row(sessions, submission_id).status is SubmissionStatus.FINISHED,
        300,
        what="the second worker to finish the job",
    )
    assert not any(path.exists() for path in left)  # the next worker did
    with sessions() as session:
        evaluation = session.scalars(select(Evaluation)).one()
        # One shard (200 images): the run stood, and its shard was handed on once its
        # heartbeat stopped (by the reaper) and ran again on the second worker.
        shard = session.scalars(select(Shard)).one()
    assert evaluation.images == 200
    assert _row(sessions, submission_id).attempts == 1
    assert shard.attempts == 2 and shard.worker != first_owner
    assert f"{submission_id}: 1 shard(s) evaluated on" in second.log_path.read_text()
