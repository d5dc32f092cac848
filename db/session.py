"""Engines and sessions: one engine per process, sessions per request or per unit of work.

SQLite (the embedded mode) gets WAL, foreign keys, a busy timeout and connections shareable
across threads; Postgres gets ``pool_pre_ping``, so a process recovers by itself after the
database restarts. Sessions never expire their objects on commit: rows read in a request are
rendered after the request's transaction has committed.

Engines connect lazily: building one (and so building the API app) works while the database
is down.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

from config.settings import Settings

__all__ = [
    "Database",
    "make_engine",
    "make_sessionmaker",
    "on_rollback",
    "run_rollback_callbacks",
    "session_scope",
    "transaction",
]

log = logging.getLogger(__name__)

# How long a SQLite writer waits for another writer's lock before giving up.
SQLITE_BUSY_TIMEOUT_S = 30.0
# How long a Postgres connection attempt may take: when the server is down, requests fail
# fast with 503 instead of hanging.
POSTGRES_CONNECT_TIMEOUT_S = 5

_ROLLBACK_CALLBACKS = "spatialbench.on_rollback"


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
        # WAL lets the API read while the worker writes progress. An in-memory database
        # answers "memory" and stays as it is.
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
    finally:
        cursor.close()


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine for ``url`` with the project's per-backend settings (see the module doc).

    For a SQLite file, its folder is created. ``kwargs`` go to ``create_engine``.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        connect_args: dict[str, Any] = {
            "check_same_thread": False,
            "timeout": SQLITE_BUSY_TIMEOUT_S,
        }
        if database in ("", ":memory:"):
            # One connection for everyone, or each would see its own empty database.
            kwargs.setdefault("poolclass", StaticPool)
        elif not database.startswith("file:"):
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args=connect_args, **kwargs)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    connect_args = {}
    if parsed.get_backend_name() == "postgresql":
        connect_args["connect_timeout"] = POSTGRES_CONNECT_TIMEOUT_S
    kwargs.setdefault("pool_pre_ping", True)
    return create_engine(url, connect_args=connect_args, **kwargs)


def make_sessionmaker(bind: Any, **kwargs: Any) -> sessionmaker[Session]:
    """Sessions that keep their objects loaded after commit (see the module doc)."""
    kwargs.setdefault("expire_on_commit", False)
    return sessionmaker(bind=bind, **kwargs)


class Database:
    """A process's engine and session factory, made from the settings on first use.

    Tests pass their own ``sessionmaker`` (bound to a connection whose transaction they roll
    back); everything else gets one from ``settings.database_url``.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        engine: Engine | None = None,
        sessions: sessionmaker[Session] | None = None,
    ) -> None:
        self.settings = settings
        self._engine = engine
        self._sessions = sessions

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            assert self.settings.database_url is not None
            self._engine = make_engine(self.settings.database_url)
        return self._engine

    @property
    def sessions(self) -> sessionmaker[Session]:
        if self._sessions is None:
            self._sessions = make_sessionmaker(self.engine)
        return self._sessions

    def session(self) -> Session:
        return self.sessions()

    def dispose(self) -> None:
        if self._engine is not None:
            self._engine.dispose()


def on_rollback(session: Session, callback: Callable[[], None]) -> None:
    """Run ``callback`` if this session's transaction is rolled back by its owner.

    For side effects outside the database that must not outlive a failed transaction, such
    as a model file stored for a submission row that was never committed.
    """
    session.info.setdefault(_ROLLBACK_CALLBACKS, []).append(callback)


def run_rollback_callbacks(session: Session) -> None:
    for callback in session.info.pop(_ROLLBACK_CALLBACKS, []):
        try:
            callback()
        except Exception:  # a cleanup failing must not hide the original error
            log.exception("rollback callback %r failed", callback)


def _forget_rollback_callbacks(session: Session) -> None:
    session.info.pop(_ROLLBACK_CALLBACKS, None)


@contextmanager
def transaction(sessions: sessionmaker[Session]) -> Iterator[Session]:
    """A session whose transaction commits when the block ends and rolls back on error.

    The owner of the transaction: code inside the block may flush, never commit.
    """
    session = sessions()
    try:
        yield session
        session.commit()
        _forget_rollback_callbacks(session)
    except BaseException:
        session.rollback()
        run_rollback_callbacks(session)
        raise
    finally:
        session.close()


_databases: dict[str, Database] = {}


@contextmanager
def session_scope(settings: Settings) -> Iterator[Session]:
    """``transaction`` on this process's database, for scripts, commands and workers.

    One engine per database URL per process, made on first use (after a fork, in the child).
    """
    assert settings.database_url is not None
    database = _databases.get(settings.database_url)
    if database is None:
        database = _databases[settings.database_url] = Database(settings)
    with transaction(database.sessions) as session:
        yield session
