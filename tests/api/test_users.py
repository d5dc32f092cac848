"""Tokens record when they were last used, at most once a minute, comparing with the time read
back from the database (aware UTC on both backends: no patching of SQLite's naive times)."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import select

from api.services.users import LAST_USED_RESOLUTION, authenticate, hash_token
from db.models import ApiToken, utcnow
from tests.factories import create_token, create_user
from tests.fixtures_db import TestDatabase


def _use(test_db: TestDatabase, token: str, now: datetime) -> datetime | None:
    """Authenticate at ``now`` with the token's row read afresh; its last use as stored."""
    test_db.session.expire_all()
    authenticate(test_db.session, token, now)
    test_db.session.expire_all()
    return test_db.session.scalar(
        select(ApiToken.last_used_at).where(ApiToken.token_hash == hash_token(token))
    )


def test_last_use_is_recorded_at_most_once_a_minute(test_db: TestDatabase) -> None:
    token = create_token(test_db.session, create_user(test_db.session))
    first = utcnow()
    assert _use(test_db, token, first) == first
    assert _use(test_db, token, first + LAST_USED_RESOLUTION - timedelta(seconds=1)) == first
    later = first + LAST_USED_RESOLUTION
    assert _use(test_db, token, later) == later
