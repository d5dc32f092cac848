"""The migrations build exactly the schema of db/models.py, on Postgres and on SQLite."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, inspect

from db.migrate import current_revision, head_revision, upgrade
from db.models import Base
from db.session import make_engine
from tests.fixtures_db import create_postgres_database, postgres_server_url


@pytest.fixture(params=["postgresql", "sqlite"])
def empty_engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    if request.param == "postgresql":
        url = create_postgres_database(postgres_server_url(), prefix="spatialbench_migrations")
    else:
        url = f"sqlite:///{tmp_path / 'migrations.db'}"
    engine = make_engine(url)
    try:
        yield engine
    finally:
        engine.dispose()


def _diff(engine: Engine) -> list[object]:
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        return list(compare_metadata(context, Base.metadata))


def test_upgrade_builds_the_models_schema(empty_engine: Engine) -> None:
    upgrade(empty_engine)
    assert _diff(empty_engine) == []
    with empty_engine.connect() as conn:
        assert current_revision(conn) == head_revision()


def test_indexes_for_the_leaderboard_and_the_reaper_exist(empty_engine: Engine) -> None:
    upgrade(empty_engine)
    inspector = inspect(empty_engine)
    submissions = {ix["name"] for ix in inspector.get_indexes("submissions")}
    assert {
        "ix_submissions_benchmark_public_status",
        "ix_submissions_status_heartbeat",
        "ix_submissions_owner_created",
    } <= submissions
    assert "ix_evaluations_benchmark_grid" in {
        ix["name"] for ix in inspector.get_indexes("evaluations")
    }
    checks = {ck["name"] for ck in inspector.get_check_constraints("submissions")}
    assert "ck_submissions_submission_status" in checks


def test_downgrade_to_base_and_up_again(empty_engine: Engine) -> None:
    from alembic import command

    from db.migrate import alembic_config

    upgrade(empty_engine)
    with empty_engine.begin() as conn:
        command.downgrade(alembic_config(connection=conn), "base")
    assert set(inspect(empty_engine).get_table_names()) <= {"alembic_version"}
    upgrade(empty_engine)
    assert _diff(empty_engine) == []


def test_upgrade_twice_changes_nothing(empty_engine: Engine) -> None:
    upgrade(empty_engine)
    upgrade(empty_engine)
    assert _diff(empty_engine) == []
