"""UtcDateTime: aware UTC datetimes out of Postgres and SQLite, naive ones refused on the way in."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.exc import StatementError

from db.models import User
from tests.fixtures_db import TestDatabase

NOON = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
# The same instant as NOON, written as a clock two hours ahead of UTC.
NOON_AT_PLUS_TWO = NOON.astimezone(timezone(timedelta(hours=2)))


def _local_time_zone(test_db: TestDatabase) -> None:
    """Make Postgres answer in a zone other than UTC (for this test's transaction only)."""
    if test_db.backend == "postgresql":
        test_db.session.execute(text("SET LOCAL TIME ZONE 'Asia/Kolkata'"))


def test_a_row_reads_back_aware_utc(test_db: TestDatabase) -> None:
    _local_time_zone(test_db)
    test_db.session.add(User(name="tz", created_at=NOON_AT_PLUS_TWO))
    test_db.session.flush()
    # Column queries bypass the identity map: these values come from the database.
    read = test_db.session.scalar(select(User.created_at).where(User.name == "tz"))
    first = test_db.session.scalar(select(func.min(User.created_at)))
    for value in (read, first):
        assert value is not None
        assert value.tzinfo is UTC
        assert value == NOON


def test_an_aware_bound_value_compares_as_utc(test_db: TestDatabase) -> None:
    test_db.session.add(User(name="tz", created_at=NOON))
    test_db.session.flush()
    # 13:30 at +02:00 is 11:30 UTC, before noon; compared as wall-clock text it would be after.
    since = datetime(2026, 3, 1, 13, 30, tzinfo=timezone(timedelta(hours=2)))
    found = test_db.session.scalars(select(User.name).where(User.created_at > since)).all()
    assert found == ["tz"]


def test_a_naive_datetime_is_refused(test_db: TestDatabase) -> None:
    test_db.session.add(User(name="naive", created_at=datetime(2026, 3, 1, 12, 0)))
    with pytest.raises(StatementError, match="naive datetime"):
        test_db.session.flush()
    test_db.session.rollback()
