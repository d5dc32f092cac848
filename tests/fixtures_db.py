"""Database fixtures: a real PostgreSQL server and SQLite, schemas built by the migrations.

Import the fixtures (``*_fixture``; they register under the names ``pg_connection``,
``test_db`` and ``pg_test_db``) into a package's ``conftest.py``. The server is
``$SPATIALBENCH_TEST_DATABASE_URL`` when set (any database on it: each test process creates and
later drops its own database there), else one that ``scripts/postgres.sh`` starts for this
process in a temporary folder and destroys at exit.

``test_db`` (parametrised over both backends) gives each test a ``TestDatabase``: on Postgres,
one connection whose outer transaction is rolled back after the test, with every session
(the app's and the test's) joined into it through savepoints; on SQLite, a fresh copy of a
migrated database file.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, make_url, text
from sqlalchemy.orm import Session, sessionmaker

from config.settings import Environment, Settings
from db.migrate import upgrade
from db.session import Database, make_engine, make_sessionmaker

ROOT = Path(__file__).resolve().parents[1]
POSTGRES_SCRIPT = ROOT / "scripts" / "postgres.sh"
BACKENDS = ["postgresql", "sqlite"]


def _run_script(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(POSTGRES_SCRIPT), *args], capture_output=True, text=True, check=False
    )


@functools.cache
def postgres_server_url() -> str:
    """The URL of a PostgreSQL server for this test process (see the module doc)."""
    given = os.environ.get("SPATIALBENCH_TEST_DATABASE_URL")
    if given:
        return given
    # Directly under the temp folder: the postgres user must be able to reach it.
    folder = tempfile.mkdtemp(prefix="spatialbench-test-pg-")
    started = _run_script("start", folder)
    if started.returncode != 0:
        shutil.rmtree(folder, ignore_errors=True)
        pytest.fail(f"could not start PostgreSQL with {POSTGRES_SCRIPT}:\n{started.stderr}")
    atexit.register(_run_script, "destroy", folder)
    return started.stdout.strip().splitlines()[-1]


def create_postgres_database(server_url: str, prefix: str = "spatialbench_test") -> str:
    """A new empty database on the server; its URL. Dropped when the process exits."""
    name = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    admin = make_engine(server_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        admin.dispose()
    atexit.register(drop_postgres_database, server_url, name)
    return make_url(server_url).set(database=name).render_as_string(hide_password=False)


def drop_postgres_database(server_url: str, name: str) -> None:
    admin = make_engine(server_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    except Exception:  # the server may already be gone at exit
        pass
    finally:
        admin.dispose()


@functools.cache
def migrated_postgres_url() -> str:
    """This process's Postgres test database, with the schema built by the migrations."""
    url = create_postgres_database(postgres_server_url())
    upgrade(url)
    return url


@functools.cache
def _postgres_engine() -> Engine:
    engine = make_engine(migrated_postgres_url())
    atexit.register(engine.dispose)
    return engine


@functools.cache
def migrated_sqlite_template() -> Path:
    """A SQLite file with the schema built by the migrations, copied for each test."""
    folder = Path(tempfile.mkdtemp(prefix="spatialbench-test-sqlite-"))
    atexit.register(shutil.rmtree, folder, True)
    path = folder / "template.db"
    engine = make_engine(f"sqlite:///{path}")
    try:
        upgrade(engine)
    finally:
        engine.dispose()  # the last connection to close checkpoints the WAL into the file
    return path


@dataclass
class TestDatabase:
    """What a test needs of its database: ``database`` for the app, ``session`` for the test
    itself. Commit in the test session to make rows visible to the app (on Postgres it only
    releases a savepoint; everything is rolled back after the test)."""

    __test__ = False  # not a test class, despite the name

    backend: str
    url: str
    database: Database
    session: Session
    sessions: sessionmaker[Session]

    def settings(self, tmp_path: Path, **overrides: Any) -> Settings:
        """Test settings for this database, state under ``tmp_path``."""
        values: dict[str, Any] = {
            "env": Environment.TEST,
            "state_dir": tmp_path / "var",
            "storage_dir": tmp_path / "models",
            "database_url": self.url,
            "auto_migrate": False,
            "daily_limit": 50,
            "concurrent_limit": 50,
        }
        values.update(overrides)
        settings = Settings(_env_file=None, **values)  # type: ignore[call-arg]
        self.database.settings = settings
        return settings


@pytest.fixture(name="pg_connection")
def pg_connection_fixture() -> Iterator[Connection]:
    """A connection to the migrated Postgres test database inside a transaction that is
    rolled back after the test."""
    connection = _postgres_engine().connect()
    transaction = connection.begin()
    try:
        yield connection
    finally:
        if transaction.is_active:
            transaction.rollback()
        connection.close()


def _postgres_test_db(connection: Connection) -> TestDatabase:
    # SQLAlchemy 2's "join a session into an external transaction" recipe: commits in the
    # sessions release savepoints, the connection's transaction is never committed.
    sessions = make_sessionmaker(connection, join_transaction_mode="create_savepoint")
    url = migrated_postgres_url()
    settings = Settings(_env_file=None, database_url=url, env=Environment.TEST)  # type: ignore[call-arg]
    database = Database(settings, sessions=sessions)
    test_sessions = sessionmaker(bind=connection, join_transaction_mode="create_savepoint")
    return TestDatabase("postgresql", url, database, test_sessions(), test_sessions)


def _sqlite_test_db(folder: Path) -> tuple[TestDatabase, Engine]:
    path = folder / "spatialbench.db"
    shutil.copyfile(migrated_sqlite_template(), path)
    url = f"sqlite:///{path}"
    engine = make_engine(url)
    settings = Settings(_env_file=None, database_url=url, env=Environment.TEST)  # type: ignore[call-arg]
    database = Database(settings, engine=engine)
    test_sessions = sessionmaker(bind=engine)
    return TestDatabase("sqlite", url, database, test_sessions(), test_sessions), engine


@pytest.fixture(name="test_db", params=BACKENDS)
def test_db_fixture(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[TestDatabase]:
    """The test's database, on Postgres and on SQLite (see the module doc)."""
    if request.param == "postgresql":
        connection = request.getfixturevalue("pg_connection")
        db = _postgres_test_db(connection)
        try:
            yield db
        finally:
            db.session.close()
        return
    db, engine = _sqlite_test_db(tmp_path)
    try:
        yield db
    finally:
        db.session.close()
        engine.dispose()


@pytest.fixture(name="pg_test_db")
def pg_test_db_fixture(pg_connection: Connection) -> Iterator[TestDatabase]:
    """``test_db`` on Postgres only."""
    db = _postgres_test_db(pg_connection)
    try:
        yield db
    finally:
        db.session.close()
