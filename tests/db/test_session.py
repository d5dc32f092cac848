"""Engines and sessions: per-backend settings, transactions owned by one place, rollback hooks."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.exc import IntegrityError

from config.settings import Settings
from db.migrate import upgrade
from db.models import ApiToken, User
from db.session import Database, make_engine, on_rollback, session_scope, transaction
from tests.fixtures_db import TestDatabase


def test_sqlite_uses_wal_and_foreign_keys(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'sub' / 'x.db'}")  # the folder is created
    with engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
        assert conn.execute(text("PRAGMA busy_timeout")).scalar() == 30000
    engine.dispose()


def test_in_memory_sqlite_is_one_shared_database() -> None:
    engine = make_engine("sqlite://")
    upgrade(engine)
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(User)).scalar() == 0
    engine.dispose()


def test_postgres_engine_pings_before_use() -> None:
    engine = make_engine("postgresql+psycopg://u@127.0.0.1:1/x")  # connects lazily
    assert engine.pool._pre_ping is True  # recovers after the server restarts
    engine.dispose()


def test_a_dangling_foreign_key_is_refused(test_db: TestDatabase) -> None:
    test_db.session.add(ApiToken(user_id=12345, token_hash="h" * 64, prefix="sb_x"))
    with pytest.raises(IntegrityError):
        test_db.session.flush()
    test_db.session.rollback()


def test_transaction_commits_or_rolls_back_and_runs_rollback_hooks(
    test_db: TestDatabase,
) -> None:
    sessions = test_db.database.sessions
    with transaction(sessions) as session:
        session.add(User(name="kept"))
    undone: list[str] = []
    with pytest.raises(RuntimeError), transaction(sessions) as session:
        session.add(User(name="dropped"))
        session.flush()
        on_rollback(session, lambda: undone.append("file removed"))
        raise RuntimeError("boom")
    with transaction(sessions) as session:
        on_rollback(session, lambda: undone.append("never"))
        names = set(session.scalars(select(User.name)))
    assert "kept" in names and "dropped" not in names
    assert undone == ["file removed"]


def test_objects_stay_loaded_after_commit(test_db: TestDatabase) -> None:
    with transaction(test_db.database.sessions) as session:
        user = User(name="loaded")
        session.add(user)
    assert user.name == "loaded" and user.id is not None  # no expired-attribute reload


def test_session_scope_uses_the_settings_database(tmp_path: Path) -> None:
    settings = Settings(_env_file=None, database_url=f"sqlite:///{tmp_path / 's.db'}")  # type: ignore[call-arg]
    upgrade(str(settings.database_url))
    with session_scope(settings) as session:
        session.add(User(name="scoped"))
    with session_scope(settings) as session:
        assert session.scalar(select(User.name)) == "scoped"
    Database(settings).dispose()
