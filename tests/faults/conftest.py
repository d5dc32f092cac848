"""Fault tests: real `spatialbench worker` processes, a real PostgreSQL server (stopped and
started where a test needs an outage), Celery over the embedded broker, and the API app
publishing through its own producer. Each test plays an operator's bad day and checks what
the database holds afterwards."""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from api.app import create_app
from api.services.users import create_token, create_user
from config.settings import Settings
from db.models import Submission, SubmissionStatus
from db.session import transaction
from tests.worker.conftest import (  # noqa: F401  (fixtures)
    benchmarks_file,
    database_url,
    sessions,
    settings,
    trained_model,
)
from tests.worker.helpers import QUICK_BENCHMARK, ROOT, WorkerProcess, wait_for

POSTGRES_SCRIPT = ROOT / "scripts" / "postgres.sh"


@pytest.fixture(params=["postgresql"])
def backend(request: pytest.FixtureRequest) -> str:  # one backend here
    return str(request.param)


@pytest.fixture
def fault_settings(settings: Settings) -> Settings:  # noqa: F811
    """Short timings so a dead worker or a lost message shows within seconds."""
    return settings.model_copy(
        update={
            "eval_limit": 40,
            "heartbeat_timeout_s": 5.0,
            "reaper_interval_s": 1.0,
            "republish_after_s": 3600.0,
            "progress_interval_s": 0.5,
            "task_soft_time_limit_s": 300,
            "task_hard_time_limit_s": 360,
        }
    )


class Workers:
    """Worker processes started by a test, stopped (or killed) at its end."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.started: list[WorkerProcess] = []

    def start(self, worker_settings: Settings) -> WorkerProcess:
        n = len(self.started) + 1
        worker = WorkerProcess(worker_settings, self.tmp_path / f"worker{n}.log", name=f"w{n}")
        self.started.append(worker)
        worker.wait_ready()
        return worker

    def stop_all(self) -> None:
        for worker in self.started:
            with_cont(worker)
            worker.stop()


def with_cont(worker: WorkerProcess) -> None:
    """Resume a frozen worker (stopping a frozen process would wait forever)."""
    if worker.proc.poll() is None:
        os.killpg(worker.proc.pid, signal.SIGCONT)


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Workers]:
    started = Workers(tmp_path)
    try:
        yield started
    finally:
        started.stop_all()


@dataclass
class Api:
    """The API app on the test's settings, with a user's token."""

    client: TestClient
    token: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def upload(self, model: Path, **fields: Any) -> dict[str, Any]:
        data = {
            "display_name": model.stem,
            "benchmark": QUICK_BENCHMARK,
            "architecture": "small_cnn",
            **fields,
        }
        response = self.client.post(
            "/api/v1/submissions",
            data={k: str(v) for k, v in data.items()},
            files={
                "file": (model.name, io.BytesIO(model.read_bytes()), "application/octet-stream")
            },
            headers=self.headers,
        )
        assert response.status_code in (200, 202), response.text
        return dict(response.json())

    def cancel(self, submission_id: str) -> dict[str, Any]:
        response = self.client.post(
            f"/api/v1/submissions/{submission_id}/cancel", headers=self.headers
        )
        assert response.status_code == 200, response.text
        return dict(response.json())


@pytest.fixture
def api(fault_settings: Settings, sessions: sessionmaker[Session]) -> Iterator[Api]:  # noqa: F811
    with transaction(sessions) as session:
        user = create_user(session, "operator", is_admin=True)
        token = create_token(session, user)[1]
    with TestClient(create_app(fault_settings)) as client:
        yield Api(client, token)


def row(sessions: sessionmaker[Session], submission_id: str) -> Submission:  # noqa: F811
    with sessions() as session:
        found = session.get(Submission, submission_id)
        assert found is not None
        return found


def wait_for_row(
    sessions: sessionmaker[Session],  # noqa: F811
    submission_id: str,
    condition: Any,
    timeout: float = 240,
    what: str = "",
) -> Submission:
    return wait_for(
        lambda: (lambda r: r if condition(r) else None)(row(sessions, submission_id)),
        timeout,
        what=what or f"submission {submission_id}",
    )


@dataclass
class Run:
    """A job running on a worker a test started: the worker, the submission and its claim."""

    worker: WorkerProcess
    submission_id: str
    token: str


def start_run(
    api: Api,
    workers: Workers,
    sessions: sessionmaker[Session],  # noqa: F811
    settings: Settings,  # noqa: F811
    model: Path,
    progress: float,
) -> Run:
    """Start a worker on ``settings``, upload ``model`` and wait until its run is past
    ``progress`` (a fraction), so that a fault strikes a job mid-way."""
    worker = workers.start(settings)
    submission_id = api.upload(model)["id"]
    running = wait_for_row(
        sessions,
        submission_id,
        lambda r: r.status is SubmissionStatus.RUNNING and r.progress >= progress,
        what=f"the run to pass {progress:.0%}",
    )
    assert running.claim_token is not None
    return Run(worker, submission_id, running.claim_token)


# --- A PostgreSQL server of the test's own, to stop and start --------------------------------


class PostgresServer:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.url = self._run("start")

    def _run(self, command: str) -> str:
        done = subprocess.run(
            ["bash", str(POSTGRES_SCRIPT), command, str(self.folder)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""

    def stop(self) -> None:
        self._run("stop")

    def start(self) -> None:
        assert self._run("start") == self.url  # same port: clients reconnect to the same URL

    def destroy(self) -> None:
        self._run("destroy")


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    # Directly under the temp folder: the postgres user must be able to reach it.
    folder = Path(tempfile.mkdtemp(prefix="spatialbench-faults-pg-"))
    server = PostgresServer(folder)
    try:
        yield server
    finally:
        server.destroy()
        shutil.rmtree(folder, ignore_errors=True)
