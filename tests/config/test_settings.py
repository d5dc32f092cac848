"""The one settings object: its production guard, and no setting that nothing reads."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from config.settings import Environment, Settings

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("evaluator", "worker", "api", "db", "storage", "spatialbench")


@pytest.fixture(autouse=True)
def _no_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # Settings read SPATIALBENCH_* variables; a developer's own must not decide these tests.
    for name in ("SPATIALBENCH_ENV", "SPATIALBENCH_DATABASE_URL", "SPATIALBENCH_BROKER_URL"):
        monkeypatch.delenv(name, raising=False)


def make(**values: Any) -> Settings:
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


PRODUCTION_URLS = {
    "database_url": "postgresql+psycopg://spatialbench:pw@postgres:5432/spatialbench",
    "broker_url": "redis://:pw@redis:6379/0",
}


def test_production_refuses_the_embedded_database(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="SPATIALBENCH_DATABASE_URL is a SQLite file"):
        make(env=Environment.PRODUCTION, state_dir=tmp_path, broker_url="redis://redis:6379/0")


def test_production_refuses_the_serverless_broker(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="SPATIALBENCH_BROKER_URL is a broker without"):
        make(
            env=Environment.PRODUCTION,
            state_dir=tmp_path,
            database_url=PRODUCTION_URLS["database_url"],
        )


def test_production_read_from_the_environment_refuses_the_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPATIALBENCH_ENV", "production")
    monkeypatch.setenv("SPATIALBENCH_STATE_DIR", str(tmp_path))
    with pytest.raises(ValidationError, match="production needs a PostgreSQL URL"):
        Settings(_env_file=None)  # type: ignore[call-arg]


def test_production_takes_a_server_database_and_broker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPATIALBENCH_ENV", "production")
    monkeypatch.setenv("SPATIALBENCH_DATABASE_URL", PRODUCTION_URLS["database_url"])
    monkeypatch.setenv("SPATIALBENCH_BROKER_URL", PRODUCTION_URLS["broker_url"])
    settings = Settings(_env_file=None, state_dir=tmp_path)  # type: ignore[call-arg]
    assert settings.env is Environment.PRODUCTION
    assert not settings.is_sqlite


@pytest.mark.parametrize("env", [Environment.DEVELOPMENT, Environment.TEST])
def test_development_and_tests_run_on_the_embedded_defaults(
    env: Environment, tmp_path: Path
) -> None:
    assert make(env=env, state_dir=tmp_path).is_sqlite


def _attributes_read(tree: ast.AST) -> set[str]:
    return {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}


def _settings_read() -> set[str]:
    """Every ``x.name`` in the project's packages outside the settings module, and what the
    settings' own public properties and methods read (``migrate_on_start`` reads
    ``auto_migrate``)."""
    names: set[str] = set()
    settings_py = ROOT / "config" / "settings.py"
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if path != settings_py:
                names |= _attributes_read(ast.parse(path.read_text(), filename=str(path)))
    (cls,) = (
        node
        for node in ast.parse(settings_py.read_text()).body
        if isinstance(node, ast.ClassDef) and node.name == "Settings"
    )
    for node in cls.body:
        if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
            names |= _attributes_read(node)
    return names


READ = _settings_read()
# Read only by the production guard, which is what it is for.
GUARD = {"env"}


@pytest.mark.parametrize("field", sorted(Settings.model_fields))
def test_every_setting_is_read_somewhere(field: str) -> None:
    """A setting nothing reads is a knob that turns nothing (an attribute of that name is read
    somewhere in the project; a name shared with another object can hide one, never invent
    one)."""
    assert field in READ | GUARD, f"nothing outside config/settings.py reads settings.{field}"
