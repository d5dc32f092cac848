"""Fixtures of the worker tests: a real Redis server, a migrated SQLite database, settings."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from config.settings import Environment, Settings
from db.migrate import upgrade
from db.session import make_engine, make_sessionmaker
from tests.fixtures_db import BACKENDS, create_postgres_database, postgres_server_url
from tests.worker.helpers import QUICK_BENCHMARK_TOML, ROOT, trained_small_cnn_file


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Redis server: ``$SPATIALBENCH_TEST_REDIS_URL``, or one started by scripts/redis.sh
    (which installs redis-server if needed) for this session."""
    given = os.environ.get("SPATIALBENCH_TEST_REDIS_URL")
    if given:
        yield given
        return
    env = {**os.environ, "REDIS_DIR": str(tmp_path_factory.mktemp("redis"))}
    script = ROOT / "scripts" / "redis.sh"
    started = subprocess.run(
        ["bash", str(script), "start"], env=env, capture_output=True, text=True
    )
    if started.returncode != 0:
        pytest.fail(f"could not start Redis: {started.stderr}")
    try:
        yield started.stdout.strip().splitlines()[-1]
    finally:
        subprocess.run(["bash", str(script), "stop"], env=env, check=False)


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small_cnn trained on digits for a few seconds, once per session."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return trained_small_cnn_file(tmp_path_factory.mktemp("models") / "trained.safetensors")
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def clean_redis(redis_url: str) -> str:
    import redis

    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    client.close()
    return redis_url


@pytest.fixture
def benchmarks_file(tmp_path: Path) -> Path:
    path = tmp_path / "benchmarks.toml"
    path.write_text(QUICK_BENCHMARK_TOML)
    return path


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """The database server: PostgreSQL (the production one) and SQLite (the embedded one).
    A test that needs only one says so with ``@pytest.mark.parametrize("backend", [...])``."""
    return str(request.param)


@pytest.fixture
def database_url(backend: str, tmp_path: Path) -> str:
    """An empty database of its own for the test (worker processes share it, so no rolled-back
    transaction here); the sessions fixture builds the schema with the migrations."""
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'state' / 'test.db'}"
    return create_postgres_database(postgres_server_url())


@pytest.fixture
def settings(tmp_path: Path, benchmarks_file: Path, database_url: str) -> Settings:
    """Embedded-mode settings in a temporary folder, tuned for fast tests: one thread, short
    intervals. The sandbox keeps the test's user (see test_sandbox for the user switch)."""
    state = tmp_path / "state"
    return Settings(
        env=Environment.TEST,
        state_dir=state,
        database_url=database_url,
        broker_url=f"sqla+sqlite:///{state / 'broker.db'}",
        storage_dir=state / "models",
        benchmarks_file=benchmarks_file,
        sandbox_user="",
        sandbox_threads=1,
        sandbox_deadline_s=120,
        progress_interval_s=0.5,
        heartbeat_timeout_s=30,
        reaper_interval_s=1,
        batch_size=256,
        example_images=4,
    )


@pytest.fixture
def sessions(settings: Settings) -> Iterator[sessionmaker[Session]]:
    """Sessions on a fresh database built by the Alembic migrations."""
    assert settings.database_url is not None
    settings.ensure_dirs()
    engine = make_engine(settings.database_url)
    upgrade(engine)
    try:
        yield make_sessionmaker(engine)
    finally:
        engine.dispose()
