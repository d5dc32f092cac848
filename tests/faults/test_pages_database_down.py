"""While the database is down, the pages answer an HTML 503 page and the API its JSON 503
(finding 7 of issue 10); both come back by themselves with the database. A real PostgreSQL
server is stopped and started again under a real ``spatialbench serve``."""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.fixtures_db import _run_script
from tests.serve_helpers import ServeProcess

pytestmark = pytest.mark.timeout(300)

PAGES = ("/", "/leaderboard/digits", f"/submissions/{uuid.uuid4()}")


@pytest.fixture
def postgres_dir() -> Iterator[str]:
    """A PostgreSQL cluster of this test's own (directly under /tmp, for the postgres user)."""
    folder = tempfile.mkdtemp(prefix="spatialbench-test-pages-down-")
    try:
        yield folder
    finally:
        _run_script("destroy", folder)
        shutil.rmtree(folder, ignore_errors=True)


def _start(folder: str) -> str:
    started = _run_script("start", folder)
    assert started.returncode == 0, started.stderr
    return started.stdout.strip().splitlines()[-1]


@pytest.fixture
def api(postgres_dir: str, tmp_path: Path) -> Iterator[ServeProcess]:
    """The API alone (as production runs it) on the test's PostgreSQL."""
    url = _start(postgres_dir)
    service = ServeProcess(
        tmp_path / "var", tmp_path, options=("--no-worker", "--no-local-user"), database_url=url
    )
    try:
        service.wait_listening()
        yield service
    finally:
        service.stop()


def test_pages_answer_an_html_503_while_the_database_is_down(
    api: ServeProcess, postgres_dir: str
) -> None:
    with httpx.Client(base_url=api.url, timeout=30) as client:
        for path in PAGES[:2]:
            assert client.get(path).status_code == 200, path

        assert _run_script("stop", postgres_dir).returncode == 0
        # curl's Accept (*/*) and a browser's: a page is HTML either way.
        for accept in ("*/*", "text/html,application/xhtml+xml"):
            for path in PAGES:
                response = client.get(path, headers={"Accept": accept})
                assert response.status_code == 503, (path, response.text)
                assert response.headers["content-type"].startswith("text/html"), path
                assert response.headers["Retry-After"] == "30"
                assert "Content-Security-Policy" in response.headers
                assert "Temporarily unavailable" in response.text
                assert "retry in a minute" in response.text
                assert "127.0.0.1" not in response.text  # connection details stay in the log
        # The API and the health check keep their JSON errors.
        for path in ("/api/v1/leaderboard/digits", "/healthz"):
            response = client.get(path, headers={"Accept": "text/html"})
            assert response.status_code == 503, path
            assert response.json()["error"] == "database_unavailable"

        _start(postgres_dir)
        for path in PAGES[:2]:
            response = client.get(path)
            assert response.status_code == 200, (path, response.text)
            assert "Temporarily unavailable" not in response.text
