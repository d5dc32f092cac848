"""The leaderboard's cached renderings (HTML page, JSON, CSV) are reused only while the board is
unchanged: a row that finishes, is marked a baseline or is flagged shows at the next request,
and a poller that sends the ETag back gets a 304 until then."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.api.conftest import Enqueued, make_client
from tests.factories import create_finished, create_user
from tests.fixtures_db import (  # noqa: F401  (fixtures)
    TestDatabase,
    pg_connection_fixture,
    test_db_fixture,
)

PATHS = (
    "/leaderboard/digits",
    "/api/v1/leaderboard/digits",
    "/api/v1/leaderboard/digits?format=csv",
    "/leaderboard/digits?sort=natural&search=model",
)


@pytest.fixture
def client(test_db: TestDatabase, tmp_path: Path) -> Iterator[TestClient]:
    _, test_client = make_client(test_db.settings(tmp_path), test_db, Enqueued([], []))
    with test_client:
        yield test_client


def _fetch_all(client: TestClient, etags: dict[str, str]) -> dict[str, str]:
    """Every path, sending the ETag it had before; each must have changed (a 200)."""
    texts = {}
    for path in PATHS:
        response = client.get(path, headers={"If-None-Match": etags.get(path, '"none"')})
        assert response.status_code == 200, (path, response.status_code)
        assert response.headers["ETag"] != etags.get(path)
        etags[path] = response.headers["ETag"]
        texts[path] = response.text
    return texts


def test_cached_boards_follow_every_change(client: TestClient, test_db: TestDatabase) -> None:
    session = test_db.session
    owner = create_user(session)
    create_finished(session, owner, display_name="first model")
    session.commit()
    etags: dict[str, str] = {}
    assert all("first model" in text for text in _fetch_all(client, etags).values())
    for path in PATHS:
        again = client.get(path, headers={"If-None-Match": etags[path]})
        assert again.status_code == 304, path
        assert client.get(path).headers["ETag"] == etags[path]

    second = create_finished(session, owner, display_name="second model",
                             evaluation={"grid": 0.5})  # fmt: skip
    session.commit()
    assert all("second model" in text for text in _fetch_all(client, etags).values())

    second.is_baseline = True
    session.commit()
    texts = _fetch_all(client, etags)
    assert '"is_baseline":true' in texts["/api/v1/leaderboard/digits"]

    second.is_flagged = True
    session.commit()
    assert not any("second model" in text for text in _fetch_all(client, etags).values())
