"""A database that goes away gives 503 JSON (never a trace), and the API recovers by itself."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from config.settings import Environment, Settings
from db.migrate import upgrade
from db.session import session_scope
from tests.api.conftest import ModelFiles
from tests.factories import auth
from tests.fixtures_db import _run_script


class Server:
    """A PostgreSQL server of its own, to stop and start under a running app."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def start(self) -> str:
        started = _run_script("start", self.folder)
        assert started.returncode == 0, started.stderr
        return started.stdout.strip().splitlines()[-1]

    def stop(self) -> None:
        assert _run_script("stop", self.folder).returncode == 0


@pytest.fixture
def server() -> Iterator[Server]:
    folder = tempfile.mkdtemp(prefix="spatialbench-test-pg-down-")
    try:
        yield Server(folder)
    finally:
        _run_script("destroy", folder)
        shutil.rmtree(folder, ignore_errors=True)


def _assert_unavailable(response_json: dict[str, str]) -> None:
    assert response_json["error"] == "database_unavailable"
    assert "retry" in response_json["detail"]
    assert "Traceback" not in response_json["detail"]
    assert "127.0.0.1" not in response_json["detail"]  # connection details stay in the log


def test_postgres_down_gives_503_and_the_api_recovers(
    server: Server, tmp_path: Path, model_files: ModelFiles
) -> None:
    url = server.start()
    upgrade(url)
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None, env=Environment.TEST, database_url=url, state_dir=tmp_path / "var",
        storage_dir=tmp_path / "models",
    )  # fmt: skip
    from api.services.users import create_token, create_user

    with session_scope(settings) as session:
        token = create_token(session, create_user(session, "alice"))[1]
    with TestClient(create_app(settings)) as client:
        assert client.get("/healthz").status_code == 200
        assert client.get("/api/v1/leaderboard/digits").status_code == 200

        server.stop()
        for path in ("/healthz", "/api/v1/leaderboard/digits", "/api/v1/submissions"):
            response = client.get(path, headers=auth(token))
            assert response.status_code == 503, (path, response.text)
            assert response.headers["Retry-After"] == "30"
            _assert_unavailable(response.json())
        response = client.post(
            "/api/v1/submissions",
            headers=auth(token),
            data={"display_name": "m", "benchmark": "digits", "architecture": "small_cnn"},
            files={"file": model_files.weights().read_bytes()},
        )
        assert response.status_code == 503
        assert not any(p.is_file() for p in (tmp_path / "models").rglob("*"))
        # The API itself still answers what needs no database.
        assert client.get("/api/v1/benchmarks").status_code == 200
        assert client.get("/metrics").status_code == 200

        assert server.start() == url  # same port: the same URL
        assert client.get("/healthz").status_code == 200
        assert client.get("/api/v1/submissions", headers=auth(token)).status_code == 200


def test_sqlite_that_cannot_be_opened_gives_503(tmp_path: Path) -> None:
    folder = tmp_path / "not-a-file.db"
    folder.mkdir()  # a directory where the database file should be
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None, env=Environment.TEST, database_url=f"sqlite:///{folder}",
        state_dir=tmp_path / "var", auto_migrate=False,
    )  # fmt: skip
    with TestClient(create_app(settings)) as client:
        for path in ("/healthz", "/api/v1/leaderboard/digits"):
            response = client.get(path)
            assert response.status_code == 503
            _assert_unavailable(response.json())
