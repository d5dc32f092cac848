"""Database test fixtures (see tests/fixtures_db.py)."""

from tests.fixtures_db import (  # noqa: F401  (fixtures)
    pg_connection_fixture,
    pg_test_db_fixture,
    test_db_fixture,
)
