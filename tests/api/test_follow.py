"""Following submissions: read one, list your own, cancel."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient

from db.models import Submission, SubmissionStatus, utcnow
from tests.api.conftest import Account
from tests.factories import create_finished, create_submission
from tests.fixtures_db import TestDatabase

# --- GET /submissions/{id} ---------------------------------------------------------------------


def test_running_submission_shows_progress(
    client: TestClient, alice: Account, test_db: TestDatabase
) -> None:
    started = utcnow()
    sub = create_submission(
        test_db.session, alice.user, status=SubmissionStatus.RUNNING, phase="grid",
        progress=0.25, forward_passes=12345, eta_seconds=42.0, started_at=started,
        heartbeat_at=started, attempts=1, worker="gpu-0",
    )  # fmt: skip
    test_db.session.commit()
    body = client.get(f"/api/v1/submissions/{sub.id}").json()
    assert body["status"] == "running" and body["phase"] == "grid"
    assert body["progress"] == 0.25 and body["forward_passes"] == 12345
    assert body["eta_seconds"] == 42.0 and body["attempts"] == 1
    assert body["started_at"] is not None and body["started_at"].endswith(("Z", "+00:00"))
    assert body["evaluation"] is None


def test_finished_submission_shows_its_metrics(
    client: TestClient, alice: Account, test_db: TestDatabase
) -> None:
    sub = create_finished(test_db.session, alice.user, evaluation={"grid": 0.031, "natural": 0.93})
    test_db.session.commit()
    body = client.get(f"/api/v1/submissions/{sub.id}").json()
    assert body["status"] == "finished"
    metrics = body["evaluation"]["metrics"]
    assert metrics["grid"] == 0.031 and metrics["natural"] == 0.93
    assert body["evaluation"]["details"]["natural"]["total"] == 540
    assert body["evaluation"]["images"] == 540


def test_failed_submission_shows_its_message(client: TestClient, test_db: TestDatabase) -> None:
    sub = create_submission(
        test_db.session, status=SubmissionStatus.FAILED, message="The model returned NaN logits."
    )
    test_db.session.commit()
    body = client.get(f"/api/v1/submissions/{sub.id}").json()
    assert body["status"] == "failed" and body["message"] == "The model returned NaN logits."


def test_private_submission_is_visible_to_its_owner_only(
    client: TestClient, alice: Account, bob: Account, test_db: TestDatabase
) -> None:
    sub = create_submission(test_db.session, alice.user, is_public=False)
    test_db.session.commit()
    assert client.get(f"/api/v1/submissions/{sub.id}", headers=alice.headers).status_code == 200
    for headers in (bob.headers, {}):
        response = client.get(f"/api/v1/submissions/{sub.id}", headers=headers)
        assert response.status_code == 404
        assert response.json() == {
            "error": "not_found",
            "detail": f"No submission {sub.id!r} (or it is private).",
        }


def test_admin_sees_private_submissions(
    client: TestClient, alice: Account, make_account: Callable[..., Account],
    test_db: TestDatabase,
) -> None:  # fmt: skip
    admin = make_account(name="admin", is_admin=True)
    sub = create_submission(test_db.session, alice.user, is_public=False)
    test_db.session.commit()
    assert client.get(f"/api/v1/submissions/{sub.id}", headers=admin.headers).status_code == 200


def test_public_submission_is_visible_without_a_token(
    client: TestClient, test_db: TestDatabase
) -> None:
    sub = create_submission(test_db.session)
    test_db.session.commit()
    assert client.get(f"/api/v1/submissions/{sub.id}").status_code == 200


def test_unknown_submission_is_not_found(client: TestClient) -> None:
    response = client.get("/api/v1/submissions/nope")
    assert response.status_code == 404 and response.json()["error"] == "not_found"


def test_a_bad_token_is_refused_even_where_none_is_needed(
    client: TestClient, test_db: TestDatabase
) -> None:
    sub = create_submission(test_db.session)
    test_db.session.commit()
    response = client.get(
        f"/api/v1/submissions/{sub.id}", headers={"Authorization": "Bearer sb_wrong"}
    )
    assert response.status_code == 401


# --- GET /submissions --------------------------------------------------------------------------


def test_list_shows_own_submissions_newest_first_with_filters(
    client: TestClient, alice: Account, bob: Account, test_db: TestDatabase
) -> None:
    from datetime import timedelta

    now = utcnow()
    old = create_submission(test_db.session, alice.user, created_at=now - timedelta(hours=2))
    new = create_submission(
        test_db.session, alice.user, created_at=now, benchmark="cifar10", is_public=False
    )
    done = create_finished(test_db.session, alice.user)
    create_submission(test_db.session, bob.user)
    test_db.session.commit()
    body = client.get("/api/v1/submissions", headers=alice.headers).json()
    assert body["total"] == 3
    assert [item["id"] for item in body["items"]][:1] in ([done.id], [new.id])
    assert {item["id"] for item in body["items"]} == {old.id, new.id, done.id}
    queued = client.get("/api/v1/submissions?status=queued", headers=alice.headers).json()
    assert [i["id"] for i in queued["items"]] == [new.id, old.id]
    cifar = client.get("/api/v1/submissions?benchmark=cifar10", headers=alice.headers).json()
    assert [i["id"] for i in cifar["items"]] == [new.id]
    page = client.get("/api/v1/submissions?limit=1&offset=1", headers=alice.headers).json()
    assert len(page["items"]) == 1 and page["total"] == 3


def test_list_needs_a_token(client: TestClient) -> None:
    assert client.get("/api/v1/submissions").status_code == 401


def test_list_refuses_an_unknown_status(client: TestClient, alice: Account) -> None:
    response = client.get("/api/v1/submissions?status=done", headers=alice.headers)
    assert response.status_code == 422
    assert response.json()["fields"][0]["field"] == "status"


# --- POST /submissions/{id}/cancel -------------------------------------------------------------


def _reload(test_db: TestDatabase, submission_id: str) -> Submission:
    test_db.session.expire_all()
    row = test_db.session.get(Submission, submission_id)
    assert row is not None
    return row


def test_cancel_queued_submission_at_once(
    client: TestClient, alice: Account, test_db: TestDatabase
) -> None:
    sub = create_submission(test_db.session, alice.user)
    test_db.session.commit()
    response = client.post(f"/api/v1/submissions/{sub.id}/cancel", headers=alice.headers)
    assert response.status_code == 200
    assert response.json()["status"] == "cancelled"
    row = _reload(test_db, sub.id)
    assert row.status is SubmissionStatus.CANCELLED and row.finished_at is not None


def test_cancel_running_submission_asks_the_worker(
    client: TestClient, alice: Account, test_db: TestDatabase
) -> None:
    sub = create_submission(test_db.session, alice.user, status=SubmissionStatus.RUNNING)
    test_db.session.commit()
    response = client.post(f"/api/v1/submissions/{sub.id}/cancel", headers=alice.headers)
    assert response.status_code == 200
    assert response.json()["status"] == "running"
    assert response.json()["cancel_requested"] is True
    assert _reload(test_db, sub.id).cancel_requested is True
    # Asking again changes nothing.
    again = client.post(f"/api/v1/submissions/{sub.id}/cancel", headers=alice.headers)
    assert again.status_code == 200 and again.json()["cancel_requested"] is True


@pytest.mark.parametrize("status", [SubmissionStatus.FINISHED, SubmissionStatus.FAILED])
def test_cancel_after_the_end_is_a_conflict(
    client: TestClient, alice: Account, test_db: TestDatabase, status: SubmissionStatus
) -> None:
    sub = create_submission(test_db.session, alice.user, status=status)
    test_db.session.commit()
    response = client.post(f"/api/v1/submissions/{sub.id}/cancel", headers=alice.headers)
    assert response.status_code == 409
    assert f"already {status.value}" in response.json()["detail"]
    assert _reload(test_db, sub.id).status is status


def test_cancel_cancelled_changes_nothing(
    client: TestClient, alice: Account, test_db: TestDatabase
) -> None:
    sub = create_submission(test_db.session, alice.user, status=SubmissionStatus.CANCELLED)
    test_db.session.commit()
    response = client.post(f"/api/v1/submissions/{sub.id}/cancel", headers=alice.headers)
    assert response.status_code == 200 and response.json()["status"] == "cancelled"


def test_only_the_owner_can_cancel(
    client: TestClient, alice: Account, bob: Account, test_db: TestDatabase
) -> None:
    public = create_submission(test_db.session, alice.user)
    private = create_submission(test_db.session, alice.user, is_public=False)
    test_db.session.commit()
    response = client.post(f"/api/v1/submissions/{public.id}/cancel", headers=bob.headers)
    assert response.status_code == 403
    assert "owner" in response.json()["detail"]
    response = client.post(f"/api/v1/submissions/{private.id}/cancel", headers=bob.headers)
    assert response.status_code == 404
    assert client.post(f"/api/v1/submissions/{public.id}/cancel").status_code == 401
    assert _reload(test_db, public.id).status is SubmissionStatus.QUEUED
    assert _reload(test_db, private.id).status is SubmissionStatus.QUEUED
