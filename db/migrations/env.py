"""Alembic environment: runs migrations on a connection handed in by ``db.migrate`` or on the
URL of the config (``sqlalchemy.url``, else the settings' ``database_url``).

SQLite cannot ALTER most things in place, so migrations render in batch mode there.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from db.models import Base
from db.session import make_engine

config = context.config
target_metadata = Base.metadata


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url")
    if url:
        return url
    from config.settings import get_settings

    settings_url = get_settings().database_url
    assert settings_url is not None
    return settings_url


def run_offline() -> None:
    context.configure(
        url=_url(),
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=_url().startswith("sqlite"),
    )
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection)
        return
    engine = make_engine(_url())
    try:
        with engine.begin() as connection:
            _configure(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
