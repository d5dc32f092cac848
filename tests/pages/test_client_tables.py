"""The command-line client's tables over the API's real answers: the vote's attacker is named,
first-order has its column, and each number on a submission carries its images."""

from __future__ import annotations

import io

import pytest
from fastapi.testclient import TestClient
from rich.console import Console

from evaluator.vocabulary import BenchmarkCounts
from spatialbench import client as cli
from tests.api.conftest import Account
from tests.factories import create_finished
from tests.fixtures_db import TestDatabase
from tests.pages import seed
from tests.pages.conftest import Board


def _rendered(render: object) -> str:
    buffer = io.StringIO()
    Console(file=buffer, width=220).print(render)
    return buffer.getvalue()


@pytest.fixture(name="full")
def full_fixture(test_db: TestDatabase, alice: Account) -> str:
    base = seed.evaluation_fields(0.93, 0.90, 0.83, 0.71, 0.93, 0.80, sensitivity=0.3)
    fields = seed.fidelity_fields(base, per_query=0.12, transfer=0.86, first_order=0.75)
    created = create_finished(test_db.session, alice.user, display_name="CLI record",
                              evaluation=fields)  # fmt: skip
    test_db.session.commit()
    return created.id


def test_leaderboard_table_names_the_attacker_and_has_first_order(
    client: TestClient, board: Board, full: str
) -> None:
    body = client.get("/api/v1/leaderboard/digits?sort=first_order").json()
    benchmarks = client.get("/api/v1/benchmarks").json()
    counts = BenchmarkCounts.of(next(b for b in benchmarks if b["name"] == "digits"))
    text = _rendered(cli.leaderboard_table(body, "digits", "first_order", counts))
    assert "grid + vote (adaptive)" in text and "first-order" in text and "worst-of-10" in text
    assert "CLI record" in text and "75.00%" in text


def test_status_lists_each_attacker_with_its_images(
    client: TestClient, board: Board, full: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    buffer = io.StringIO()
    monkeypatch.setattr(cli, "out", Console(file=buffer, width=220))
    cli.print_state(client.get(f"/api/v1/submissions/{full}").json())
    text = buffer.getvalue()
    assert "grid + vote (adaptive)" in text and "80.00% (50 images)" in text
    assert "grid + vote (per-query)" in text and "12.00% (50 images)" in text
    assert "grid + vote (transfer)" in text and "86.00% (50 images)" in text
    assert "first-order" in text and "75.00% (60 images)" in text
    assert "grid" in text and "71.00% (540 images)" in text
