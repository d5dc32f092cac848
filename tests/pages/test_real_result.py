"""A real evaluation of a small CNN, through the worker's bounds check and its
`evaluation_from_result`, stored and shown: the model page and the API show the three vote
attackers, first-order and the ablations exactly as the evaluator measured them."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from db.models import SubmissionStatus, utcnow
from tests.api.conftest import Account
from tests.factories import create_submission
from tests.fixtures_db import TestDatabase
from tests.worker.helpers import digits_result
from worker.result_bounds import check_result
from worker.runner import evaluation_from_result

HTML = {"Accept": "text/html"}


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    # The digits defaults: every vote attacker, first-order and the ablations.
    return digits_result(tmp_path_factory.mktemp("m"), limit=4)


@pytest.fixture(name="stored")
def stored_fixture(test_db: TestDatabase, alice: Account, measured: dict[str, Any]) -> str:
    s = test_db.session
    submission = create_submission(
        s, alice.user, display_name="Measured CNN", status=SubmissionStatus.FINISHED,
        progress=1.0, finished_at=utcnow(),
    )  # fmt: skip
    s.add(evaluation_from_result(submission, check_result(measured, "digits"), []))
    s.commit()
    return submission.id


def test_the_model_page_shows_what_was_measured(
    client: TestClient, stored: str, measured: dict[str, Any]
) -> None:
    page = client.get(f"/submissions/{stored}", headers=HTML).text
    for protocol in ("adaptive", "per-query", "transfer"):
        assert f'id="vote-{protocol}"' in page, protocol
    for name, record in measured["ablations"].items():
        assert f'id="ablation-{name}"' in page, name
        assert record["label"] in page
    first_order = measured["metrics"]["first_order"]
    if first_order.get("error"):
        assert f"not differentiable: {first_order['error']}" in page
    else:
        assert f"{first_order['correct']} / {first_order['total']} images" in page


def test_the_api_gives_the_ablations_as_measured(
    client: TestClient, stored: str, measured: dict[str, Any]
) -> None:
    evaluation = client.get(f"/api/v1/submissions/{stored}").json()["evaluation"]
    assert set(evaluation["ablations"]) == set(measured["ablations"])
    for name, record in measured["ablations"].items():
        shown = evaluation["ablations"][name]
        for key in ("label", "grid", "fill", "canvas", "images", "correct", "accuracy", "natural"):
            assert shown[key] == record[key], (name, key)
        # The whole checked record is stored, not only what the per-image columns give back.
        assert shown["forward_passes"] == record["forward_passes"], name
    metrics = evaluation["metrics"]
    for key in ("grid_vote", "grid_vote_per_query", "grid_vote_transfer", "first_order"):
        assert metrics[key] == measured["metrics"][key]["accuracy"], key
