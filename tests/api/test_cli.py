"""Admin commands: db upgrade, users create, tokens create/revoke/list, against a real
database, with the token then used over HTTP."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import inspect
from typer.testing import CliRunner

from api.app import create_app
from config.settings import Settings, get_settings
from db.session import make_engine
from spatialbench.cli import app as cli
from tests.factories import auth
from tests.fixtures_db import create_postgres_database, postgres_server_url


@pytest.fixture(params=["postgresql", "sqlite"])
def database_url(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    if request.param == "postgresql":
        url = create_postgres_database(postgres_server_url(), prefix="spatialbench_cli")
    else:
        url = f"sqlite:///{tmp_path / 'cli.db'}"
    monkeypatch.setenv("SPATIALBENCH_DATABASE_URL", url)
    monkeypatch.setenv("SPATIALBENCH_STATE_DIR", str(tmp_path / "var"))
    get_settings.cache_clear()
    yield url
    get_settings.cache_clear()


def _run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_admin_commands_end_to_end(database_url: str, tmp_path: Path) -> None:
    code, _, err = _run("db", "upgrade")
    assert code == 0, err
    engine = make_engine(database_url)
    assert {"users", "api_tokens", "submissions", "evaluations"} <= set(
        inspect(engine).get_table_names()
    )
    engine.dispose()

    code, out, err = _run("users", "create", "alice", "--admin")
    assert code == 0, err
    token = out.strip()
    assert token.startswith("sb_") and len(token) > 40  # stdout holds the token alone
    assert "shown once" in err

    code, _, err = _run("users", "create", "alice")
    assert code == 1 and "already exists" in err

    code, out, _ = _run("tokens", "create", "alice", "--label", "laptop")
    assert code == 0
    second = out.strip()
    code, out, _ = _run("tokens", "list", "alice")
    assert code == 0 and out.count("active") == 2 and "laptop" in out

    settings = Settings(_env_file=None, database_url=database_url, state_dir=tmp_path / "var",
                        auto_migrate=False)  # type: ignore[call-arg]  # fmt: skip
    with TestClient(create_app(settings)) as client:
        me = client.get("/api/v1/me", headers=auth(token))
        assert me.status_code == 200 and me.json()["is_admin"] is True

        code, _, err = _run("tokens", "revoke", token[:10])
        assert code == 0 and "revoked token" in err
        assert client.get("/api/v1/me", headers=auth(token)).status_code == 401
        assert client.get("/api/v1/me", headers=auth(second)).status_code == 200

        code, _, err = _run("tokens", "revoke", second)  # the whole token works too
        assert code == 0
        assert client.get("/api/v1/me", headers=auth(second)).status_code == 401

    code, _, err = _run("tokens", "revoke", "sb_doesnotexist")
    assert code == 1 and "No token matches" in err
    code, _, err = _run("tokens", "create", "nobody")
    assert code == 1 and "No user named 'nobody'" in err
