"""Column types of our own: one timezone-aware datetime, so no caller patches up timezones.

Every time the service stores is UTC. Postgres keeps ``timestamptz`` and answers in the
connection's time zone; SQLite keeps text without an offset and answers naive datetimes. One
column type makes both answer aware UTC datetimes, and refuses a naive one on the way in, since
its zone would be a guess.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import DateTime, Dialect
from sqlalchemy.types import TypeDecorator

__all__ = ["UtcDateTime"]


class UtcDateTime(TypeDecorator[datetime]):
    """``DateTime(timezone=True)`` that stores UTC and always reads back aware UTC datetimes.

    The database type is unchanged (``timestamptz`` on Postgres, ``DATETIME`` on SQLite), so
    the migrations need nothing.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(
                f"naive datetime {value.isoformat()} given for a UTC column: pass an aware "
                "datetime (db.models.utcnow())"
            )
        # SQLite writes the wall-clock fields and drops the offset: convert them first.
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)  # SQLite: stored as UTC, read back naive
        return value.astimezone(UTC)
