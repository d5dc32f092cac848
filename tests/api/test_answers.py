"""The API's answer for a submission, validated from its rows: every field, in order, as it
was when the rows were copied into the schema by hand; the evaluation only once finished."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from fastapi.testclient import TestClient

from db.models import SubmissionStatus
from tests.api.conftest import Account
from tests.factories import create_finished
from tests.fixtures_db import TestDatabase


def test_a_finished_submission_answers_every_field_in_order(
    client: TestClient, alice: Account, test_db: TestDatabase
) -> None:
    at = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    done = at + timedelta(minutes=2)
    details = {
        "natural": {"accuracy": 0.9, "correct": 486, "total": 540},
        "grid_vote_per_query": {"accuracy": 0.25, "attacker": "per-query"},
        "grid_vote_transfer": {"correct": 3},  # no accuracy: not measured
    }
    sub = create_finished(
        test_db.session, alice.user, display_name="Exact", mean=[0.5], std=[0.25],
        paper_url="https://example.org/paper", description="d", file_sha256="ab" * 32,
        phase="done", forward_passes=1000, eta_seconds=0.0, attempts=1, created_at=at,
        started_at=at + timedelta(minutes=1), finished_at=done, heartbeat_at=done,
        evaluation={"metrics": details, "first_order": 0.4, "created_at": done},
    )  # fmt: skip
    test_db.session.commit()
    body = client.get(f"/api/v1/submissions/{sub.id}").json()
    evaluation = {
        "benchmark": "digits",
        "metrics": {
            "natural": 0.9, "random": 0.6, "worst_of_k": 0.3, "grid": 0.1, "vote_natural": 0.88,
            "grid_vote": 0.2, "grid_vote_per_query": 0.25, "grid_vote_transfer": None,
            "first_order": 0.4,
        },
        "details": details, "ablations": {}, "images": 540, "landscape": {"shape": [31, 5, 5]},
        "examples": None, "forward_passes": 1000, "wall_time_s": 1.5, "device": "cpu",
        "precision": "fp32", "seed": 0, "versions": {"torch": "2"}, "config": {}, "cost": {},
        "created_at": "2026-03-01T12:02:00Z",
    }  # fmt: skip
    expected = {
        "id": sub.id, "status_url": f"http://testserver/api/v1/submissions/{sub.id}",
        "owner": "alice", "display_name": "Exact", "benchmark": "digits",
        "model_format": "safetensors", "architecture": "small_cnn", "mean": [0.5],
        "std": [0.25], "training_method": "standard", "extra_data": False,
        "paper_url": "https://example.org/paper", "description": "d", "is_public": True,
        "is_baseline": False, "file_sha256": "ab" * 32, "file_size": 1234,
        "status": "finished", "phase": "done", "progress": 1.0, "forward_passes": 1000,
        "eta_seconds": 0.0, "message": None, "attempts": 1, "cancel_requested": False,
        "created_at": "2026-03-01T12:00:00Z", "started_at": "2026-03-01T12:01:00Z",
        "finished_at": "2026-03-01T12:02:00Z", "heartbeat_at": "2026-03-01T12:02:00Z",
        "evaluation": evaluation,
    }  # fmt: skip
    assert body == expected
    assert list(body) == list(expected)
    assert list(body["evaluation"]) == list(evaluation)


def test_an_earlier_result_is_hidden_until_the_submission_finishes_again(
    client: TestClient, alice: Account, test_db: TestDatabase
) -> None:
    sub = create_finished(test_db.session, alice.user)
    sub.status = SubmissionStatus.QUEUED  # resubmitted: the old row stays until replaced
    test_db.session.commit()
    body = client.get(f"/api/v1/submissions/{sub.id}").json()
    assert body["status"] == "queued" and body["evaluation"] is None
