"""The API publishes through a producer made from its own settings, and imports only the
queue's leaf module of ``worker`` (no Celery app, no signals, no tasks)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from fastapi.testclient import TestClient

from api.app import create_app
from tests.api.conftest import Account, ModelFiles, upload
from tests.fixtures_db import TestDatabase
from worker.queue import EVALUATE_TASK, QUEUE

ROOT = Path(__file__).resolve().parents[2]


def test_the_api_imports_only_the_queue_module_of_the_worker() -> None:
    code = (
        "import sys, api.app, worker.queue;"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'worker'))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert done.stdout.split() == ["['worker',", "'worker.queue']"]


def test_the_worker_modules_import_without_a_cycle() -> None:
    # Each on its own, first in a fresh interpreter: a cycle would fail for one of them.
    for module in ("worker.queue", "worker.app", "worker.runtime", "worker.tasks", "worker.cli"):
        subprocess.run([sys.executable, "-c", f"import {module}"], cwd=ROOT, check=True)


def test_an_accepted_upload_is_published_to_the_apps_own_broker(
    test_db: TestDatabase, tmp_path: Path, alice: Account, model_files: ModelFiles
) -> None:
    broker = f"sqla+sqlite:///{tmp_path / 'broker.db'}"
    settings = test_db.settings(tmp_path, broker_url=broker)
    with TestClient(create_app(settings, database=test_db.database)) as client:
        response = upload(client, model_files.weights(), alice)
        assert response.status_code == 202, response.text
        producer = client.app.state.enqueuer  # type: ignore[attr-defined]
        with producer.celery.connection_for_write() as connection:
            message = connection.SimpleQueue(QUEUE).get(timeout=5)
            assert message.headers["task"] == EVALUATE_TASK
            assert message.headers["argsrepr"] == repr([response.json()["id"]])
            message.ack()
