"""The service on object storage: the API and a real `spatialbench worker` process share only
Postgres, Redis and an S3 server (moto's server mode, started by tests/storage/conftest.py),
each with a state folder of its own. And on the local backend, the files lie where they always
have (existing demo and state folders keep working)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from api.app import create_app
from api.services.users import create_token, create_user
from config.settings import Settings
from db.models import Evaluation, Submission, SubmissionStatus
from db.session import transaction
from storage import LocalStorage, S3Storage, example_key, model_key, storage_from_settings
from tests.storage.conftest import CREDENTIALS, new_bucket, s3_endpoint  # noqa: F401
from tests.worker.helpers import QUICK_BENCHMARK, WorkerProcess, sha256, wait_for
from worker.results import results_prefix
from worker.runner import Outcome, run_submission

pytestmark = pytest.mark.timeout(600)


def _on_s3(settings: Settings, endpoint: str, bucket: str, folder: Path) -> Settings:
    """``settings`` on the S3 bucket, with a state folder of their own (so nothing is shared
    through the disk)."""
    return settings.model_copy(
        update={
            "state_dir": folder,
            "storage_dir": folder / "models",
            "storage_url": f"s3://{bucket}/spatialbench",
            "s3_endpoint_url": endpoint,
            "s3_access_key_id": CREDENTIALS.access_key_id,
            "s3_secret_access_key": SecretStr(CREDENTIALS.secret_access_key),
        }
    )


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def _upload(client: TestClient, token: str, model: Path) -> str:
    response = client.post(
        "/api/v1/submissions",
        data={"display_name": "s3", "benchmark": QUICK_BENCHMARK, "architecture": "small_cnn"},
        files={"file": (model.name, io.BytesIO(model.read_bytes()), "application/octet-stream")},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def _token(sessions: sessionmaker[Session]) -> str:
    with transaction(sessions) as session:
        user = create_user(session, "s3-user")
        return create_token(session, user)[1]


def _row(sessions: sessionmaker[Session], submission_id: str) -> Submission:
    with sessions() as session:
        row = session.get(Submission, submission_id)
        assert row is not None
        return row


@pytest.fixture
def worker_box() -> Iterator[list[WorkerProcess]]:
    started: list[WorkerProcess] = []
    yield started
    for worker in started:
        worker.stop()


@pytest.mark.parametrize("backend", ["postgresql"])
def test_api_and_worker_share_only_the_s3_server(
    settings: Settings,
    sessions: sessionmaker[Session],
    clean_redis: str,
    s3_endpoint: str,  # noqa: F811
    trained_model: Path,
    worker_box: list[WorkerProcess],
    tmp_path: Path,
) -> None:
    bucket = new_bucket(s3_endpoint)
    base = settings.model_copy(update={"broker_url": clean_redis, "eval_limit": 40})
    api_settings = _on_s3(base, s3_endpoint, bucket, tmp_path / "api")
    worker_settings = _on_s3(base, s3_endpoint, bucket, tmp_path / "worker")
    worker = WorkerProcess(worker_settings, tmp_path / "worker.log")
    worker_box.append(worker)
    worker.wait_ready()
    token = _token(sessions)

    with TestClient(create_app(api_settings)) as client:
        submission_id = _upload(client, token, trained_model)

        def finished() -> bool:
            row = _row(sessions, submission_id)
            assert row.status not in (SubmissionStatus.FAILED, SubmissionStatus.CANCELLED), (
                row.message,
                worker.log_path.read_text(),
            )
            return row.status is SubmissionStatus.FINISHED

        wait_for(finished, 300, what="the worker to evaluate the upload")
        with sessions() as session:
            evaluation = session.scalars(select(Evaluation)).one()
        assert evaluation.examples
        name = Path(evaluation.examples[0]["original"]).stem
        image = client.get(f"/submissions/{submission_id}/examples/{name}.png")
        assert image.status_code == 200, image.text
        assert image.headers["content-type"] == "image/png"

    bucket_store = S3Storage(
        bucket, prefix="spatialbench", endpoint=s3_endpoint, credentials=CREDENTIALS
    )
    # The page served the worker's bytes from the bucket.
    assert image.content == bucket_store.read_bytes(example_key(submission_id, name))
    assert image.content.startswith(b"\x89PNG\r\n\x1a\n")
    assert bucket_store.exists(model_key(sha256(trained_model)))
    # The stored result was removed once recorded.
    assert bucket_store.list(results_prefix(submission_id)) == []
    # Nothing of the model, the examples or the result went through either local folder.
    for folder in (api_settings.storage_dir, worker_settings.storage_dir):
        assert folder is not None
        assert _files(folder) == []
    assert _files(api_settings.state_dir / "incoming") == []


@pytest.mark.parametrize("backend", ["postgresql"])
def test_a_model_missing_from_s3_fails_with_upload_it_again(
    settings: Settings,
    sessions: sessionmaker[Session],
    s3_endpoint: str,  # noqa: F811
    trained_model: Path,
    tmp_path: Path,
) -> None:
    on_s3 = _on_s3(settings, s3_endpoint, new_bucket(s3_endpoint), tmp_path / "s3")
    storage = storage_from_settings(on_s3)
    token = _token(sessions)
    with TestClient(create_app(on_s3)) as client:
        submission_id = _upload(client, token, trained_model)
    storage.delete(model_key(sha256(trained_model)))

    assert run_submission(sessions, submission_id, on_s3, storage=storage) is Outcome.FAILED
    assert "upload it again" in (_row(sessions, submission_id).message or "")


@pytest.mark.parametrize("backend", ["sqlite"])
def test_the_local_backend_keeps_the_layout_on_disk(
    settings: Settings,
    sessions: sessionmaker[Session],
    trained_model: Path,
) -> None:
    """The default storage is ``file://<storage_dir>``, laid out as before: models at
    ``<sha[:2]>/<sha>``, examples at ``examples/<id>/NN_kind.png``; uploads are staged in
    ``<state_dir>/incoming``; a recorded result leaves no file."""
    settings.eval_limit = 40
    storage = storage_from_settings(settings)
    assert isinstance(storage, LocalStorage) and storage.root == settings.storage_dir
    token = _token(sessions)
    with TestClient(create_app(settings)) as client:
        submission_id = _upload(client, token, trained_model)
    digest = sha256(trained_model)
    assert settings.model_path(digest).read_bytes() == trained_model.read_bytes()

    assert run_submission(sessions, submission_id, settings, storage=storage) is Outcome.FINISHED
    with sessions() as session:
        evaluation = session.scalars(select(Evaluation)).one()
    assert settings.storage_dir is not None
    expected = {settings.model_path(digest)}
    for example in evaluation.examples or []:
        for kind in ("original", "transformed"):
            path = settings.storage_dir / "examples" / submission_id / Path(example[kind]).name
            assert example[kind] == f"examples/{submission_id}/{path.name}"
            expected.add(path)
    assert len(expected) > 1
    assert set(_files(settings.storage_dir)) == expected
    assert _files(settings.state_dir / "incoming") == []
    assert not (settings.storage_dir / "results" / submission_id).exists()
