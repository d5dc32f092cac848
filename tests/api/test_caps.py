"""Resubmits and the caps; each user's submission stands on its own."""

from __future__ import annotations

from collections.abc import Callable

from fastapi.testclient import TestClient
from sqlalchemy import func, select

from db.models import Submission, SubmissionStatus
from tests.api.conftest import Account, Enqueued, ModelFiles, change_row, upload
from tests.fixtures_db import TestDatabase


def _cancel(client: TestClient, submission_id: str, account: Account) -> None:
    response = client.post(f"/api/v1/submissions/{submission_id}/cancel", headers=account.headers)
    assert response.status_code == 200, response.text


def test_cancel_and_resubmit_counts_towards_the_daily_cap(
    client: TestClient, make_account: Callable[..., Account], model_files: ModelFiles,
) -> None:  # fmt: skip
    carol = make_account(name="carol", daily_limit=2)
    first = upload(client, model_files.weights(), carol)
    assert first.status_code == 202
    _cancel(client, first.json()["id"], carol)
    again = upload(client, model_files.weights(), carol)
    assert again.status_code == 202 and again.json()["id"] == first.json()["id"]
    _cancel(client, first.json()["id"], carol)
    # Two submissions today (one new, one resubmit): the third is refused.
    third = upload(client, model_files.weights(), carol)
    assert third.status_code == 429, third.text
    assert "daily limit is 2" in third.json()["detail"]


def test_another_users_private_file_is_neither_revealed_nor_shared(
    client: TestClient, alice: Account, bob: Account, model_files: ModelFiles,
    test_db: TestDatabase, enqueued: Enqueued,
) -> None:  # fmt: skip
    private = upload(client, model_files.weights(), alice, is_public="false")
    assert private.status_code == 202
    response = upload(client, model_files.weights(), bob, display_name="Bob's")
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["id"] != private.json()["id"]
    assert (body["owner"], body["display_name"], body["duplicate"]) == ("bob", "Bob's", False)
    assert "another user" not in response.text
    count = test_db.session.scalar(select(func.count()).select_from(Submission))
    assert count == 2
    assert enqueued.ids == [private.json()["id"], body["id"]]


def test_a_resubmit_right_after_a_cancel_of_a_running_job_runs(
    client: TestClient, alice: Account, model_files: ModelFiles, test_db: TestDatabase,
    enqueued: Enqueued,
) -> None:  # fmt: skip
    first = upload(client, model_files.weights(), alice).json()
    change_row(test_db, first["id"], status=SubmissionStatus.RUNNING, claim_token="a" * 32)
    _cancel(client, first["id"], alice)
    response = upload(client, model_files.weights(), alice, mean="0.5,0.5,0.5", std="0.5,0.5,0.5")
    assert response.status_code == 202, response.text
    body = response.json()
    assert (body["status"], body["cancel_requested"], body["mean"]) == ("queued", False, [0.5] * 3)
    assert enqueued.ids == [first["id"], first["id"]]
    test_db.session.expire_all()
    row = test_db.session.get(Submission, first["id"])
    assert row is not None and row.claim_token is None  # the old run is fenced out
