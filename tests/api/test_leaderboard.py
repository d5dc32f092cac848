"""The leaderboard: JSON and CSV over HTTP, and the service function the pages use."""

from __future__ import annotations

import csv
import io
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.routes.leaderboard import MAX_PAGE
from api.schemas import LeaderboardRow, Metrics, SortKey, SortOrder
from api.services.leaderboard import MAX_PER_PAGE, leaderboard
from db.models import Evaluation, SubmissionStatus, utcnow
from evaluator.vocabulary import BOARD_METRICS, METRIC_KEYS, TrainingMethod
from tests.api.conftest import Account
from tests.factories import create_finished, create_submission
from tests.fixtures_db import TestDatabase


@pytest.fixture
def board(test_db: TestDatabase, alice: Account, bob: Account) -> dict[str, str]:
    """Four ranked entries and five that must never show up; returns ids by name."""
    s = test_db.session
    now = utcnow()
    ids = {
        "standard": create_finished(
            s, alice.user, display_name="Standard ResNet",
            evaluation={"natural": 0.93, "grid": 0.03, "grid_vote": 0.05},
            created_at=now - timedelta(days=3),
        ).id,
        "wok": create_finished(
            s, bob.user, display_name="Worst-of-10", architecture="resnet32",
            training_method=TrainingMethod.WORST_OF_K,
            evaluation={"natural": 0.90, "grid": 0.71, "grid_vote": 0.82},
            created_at=now - timedelta(days=2), description="robust optimisation",
        ).id,
        "tie": create_finished(
            s, alice.user, display_name="augmented", training_method=TrainingMethod.AUGMENTATION,
            evaluation={"natural": 0.91, "grid": 0.03, "grid_vote": None},
            created_at=now - timedelta(days=1),
        ).id,
        "nogrid": create_finished(
            s, bob.user, display_name="=HYPERLINK(evil)",
            evaluation={"natural": 0.5, "grid": None, "grid_vote": None}, created_at=now,
        ).id,
    }  # fmt: skip
    # Never on the board: private, flagged, unfinished, failed, another benchmark.
    create_finished(s, alice.user, is_public=False, evaluation={"grid": 0.99})
    create_finished(s, alice.user, is_flagged=True, evaluation={"grid": 0.99})
    create_submission(s, alice.user, status=SubmissionStatus.RUNNING)
    create_submission(s, alice.user, status=SubmissionStatus.FAILED)
    create_finished(s, alice.user, benchmark="cifar10", evaluation={"grid": 0.99})
    s.commit()
    return ids


def _names(body: dict[str, Any]) -> list[str]:
    return [row["display_name"] for row in body["rows"]]


def test_default_is_grid_accuracy_best_first_with_shared_ranks(
    client: TestClient, board: dict[str, str]
) -> None:
    body = client.get("/api/v1/leaderboard/digits").json()
    assert body["total"] == 4 and body["sort"] == "grid" and body["order"] == "desc"
    assert [r["submission_id"] for r in body["rows"]] == [
        board["wok"], board["standard"], board["tie"], board["nogrid"],
    ]  # fmt: skip
    # Equal grid accuracy shares a rank; a missing value comes last.
    assert [r["rank"] for r in body["rows"]] == [1, 2, 2, 4]
    first = body["rows"][0]
    assert first["grid"] == 0.71 and first["grid_vote"] == 0.82 and first["owner"] == "bob"
    assert first["training_method"] == "worst-of-k" and first["architecture"] == "resnet32"


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("sort=natural", ["Standard ResNet", "augmented", "Worst-of-10", "=HYPERLINK(evil)"]),
        ("sort=natural&order=asc", ["=HYPERLINK(evil)", "Worst-of-10", "augmented",
                                    "Standard ResNet"]),
        ("sort=grid_vote", ["Worst-of-10", "Standard ResNet", "augmented", "=HYPERLINK(evil)"]),
        ("sort=name", ["=HYPERLINK(evil)", "augmented", "Standard ResNet", "Worst-of-10"]),
        ("sort=created_at", ["=HYPERLINK(evil)", "augmented", "Worst-of-10", "Standard ResNet"]),
        ("training_method=worst-of-k", ["Worst-of-10"]),
        ("architecture=resnet32", ["Worst-of-10"]),
        ("search=ROBUST", ["Worst-of-10"]),
        ("search=bob", ["Worst-of-10", "=HYPERLINK(evil)"]),
        ("search=100%25", []),
    ],
)  # fmt: skip
def test_sort_and_filter(
    client: TestClient, board: dict[str, str], query: str, expected: list[str]
) -> None:
    response = client.get(f"/api/v1/leaderboard/digits?{query}")
    assert response.status_code == 200
    assert _names(response.json()) == expected


def test_pages(client: TestClient, board: dict[str, str]) -> None:
    first = client.get("/api/v1/leaderboard/digits?per_page=3").json()
    second = client.get("/api/v1/leaderboard/digits?per_page=3&page=2").json()
    assert len(first["rows"]) == 3 and first["total"] == 4
    assert [r["rank"] for r in second["rows"]] == [4]


def test_csv_has_a_header_and_every_row(client: TestClient, board: dict[str, str]) -> None:
    response = client.get("/api/v1/leaderboard/digits?format=csv")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/csv")
    assert "digits-leaderboard.csv" in response.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert [r["rank"] for r in rows] == ["1", "2", "2", "4"]
    assert rows[0]["display_name"] == "Worst-of-10" and rows[0]["grid"] == "0.71"
    assert rows[2]["grid_vote"] == ""  # missing, not "None"
    # User text that a spreadsheet would run as a formula is defused.
    assert rows[3]["display_name"] == "'=HYPERLINK(evil)"


def test_empty_leaderboard(client: TestClient) -> None:
    body = client.get("/api/v1/leaderboard/mnist").json()
    assert body["rows"] == [] and body["total"] == 0
    assert client.get("/api/v1/leaderboard/mnist?format=csv").text.startswith("rank,")


def test_unknown_benchmark_is_not_found(client: TestClient) -> None:
    response = client.get("/api/v1/leaderboard/cifar100")
    assert response.status_code == 404
    assert "known benchmarks" in response.json()["detail"]


def test_bad_sort_key_is_refused(client: TestClient) -> None:
    response = client.get("/api/v1/leaderboard/digits?sort=accuracy")
    assert response.status_code == 422 and response.json()["fields"][0]["field"] == "sort"


def test_service_function_for_the_pages(test_db: TestDatabase, board: dict[str, str]) -> None:
    page = leaderboard(
        test_db.session, "digits", sort=SortKey.NATURAL, order=SortOrder.ASC, page=1, per_page=2
    )
    assert page.total == 4 and page.pages == 2
    assert [r.display_name for r in page.rows] == ["=HYPERLINK(evil)", "Worst-of-10"]
    everything = leaderboard(test_db.session, "digits", per_page=None)
    assert len(everything.rows) == 4


# --- Bounds on the query ------------------------------------------------------------------------

# Past any 64-bit offset: the database driver cannot even bind it.
HUGE_PAGE = "99999999999999999999"


@pytest.mark.parametrize("fmt", ["json", "csv"])
def test_a_page_number_past_any_board_is_refused_with_a_message(
    client: TestClient, board: dict[str, str], fmt: str
) -> None:
    response = client.get(f"/api/v1/leaderboard/digits?page={HUGE_PAGE}&format={fmt}")
    assert response.status_code == 422, response.text
    field = response.json()["fields"][0]
    assert field["field"] == "page" and "less than or equal to" in field["message"]


def test_the_last_allowed_page_is_empty_not_an_error(
    client: TestClient, board: dict[str, str]
) -> None:
    response = client.get(f"/api/v1/leaderboard/digits?page={MAX_PAGE}&per_page={MAX_PER_PAGE}")
    assert response.status_code == 200, response.text
    assert response.json()["rows"] == [] and response.json()["total"] == 4


def test_the_html_leaderboard_survives_a_huge_page_number(
    client: TestClient, board: dict[str, str]
) -> None:
    response = client.get(f"/leaderboard/digits?page={HUGE_PAGE}&per_page={HUGE_PAGE}")
    # These are links people edit and share: read leniently (clamped), never a 500.
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/html")


def test_first_order_sorts_with_missing_values_last_in_json_and_csv(
    client: TestClient, test_db: TestDatabase, alice: Account
) -> None:
    s = test_db.session
    low = create_finished(s, alice.user, evaluation={"grid": 0.5, "first_order": 0.6}).id
    high = create_finished(s, alice.user, evaluation={"grid": 0.4, "first_order": 0.8}).id
    missing = create_finished(s, alice.user, evaluation={"grid": 0.9, "first_order": None}).id
    s.commit()
    body = client.get("/api/v1/leaderboard/digits?sort=first_order").json()
    assert body["sort"] == "first_order" and body["order"] == "desc"
    assert [r["submission_id"] for r in body["rows"]] == [high, low, missing]
    assert [r["first_order"] for r in body["rows"]] == [0.8, 0.6, None]
    worst = client.get("/api/v1/leaderboard/digits?sort=first_order&order=asc").json()
    assert [r["submission_id"] for r in worst["rows"]] == [low, high, missing]
    rows = list(csv.DictReader(io.StringIO(
        client.get("/api/v1/leaderboard/digits?sort=first_order&format=csv").text
    )))  # fmt: skip
    assert [r["first_order"] for r in rows] == ["0.8", "0.6", ""]


def test_the_typed_fields_of_the_metrics_are_the_vocabularys_keys() -> None:
    # Schemas and columns are typed, so they spell the keys out; they must be the vocabulary's.
    assert list(Metrics.model_fields) == list(METRIC_KEYS)
    sortable = {k.value for k in SortKey} - {SortKey.CREATED_AT.value, SortKey.NAME.value}
    assert sortable == {k.value for k in BOARD_METRICS}
    assert set(BOARD_METRICS) <= set(LeaderboardRow.model_fields)
    assert set(BOARD_METRICS) <= set(Evaluation.__table__.columns.keys())
