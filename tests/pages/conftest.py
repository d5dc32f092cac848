"""Page test fixtures: the API's app and database fixtures, plus a seeded leaderboard."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from config.settings import Settings
from db.models import Evaluation, Submission, SubmissionStatus, utcnow
from evaluator.vocabulary import TrainingMethod
from tests.api.conftest import Account, Enqueued, make_client
from tests.factories import create_finished, create_submission, create_token, create_user
from tests.fixtures_db import (  # noqa: F401  (fixtures)
    TestDatabase,
    pg_connection_fixture,
    test_db_fixture,
)
from tests.pages import seed

XSS_NAME = "<script>alert(1)</script>"


@pytest.fixture(name="settings")
def settings_fixture(test_db: TestDatabase, tmp_path: Path) -> Settings:
    return test_db.settings(tmp_path)


@pytest.fixture(name="client")
def client_fixture(settings: Settings, test_db: TestDatabase) -> Iterator[TestClient]:
    _, client = make_client(settings, test_db, Enqueued([], []))
    with client:
        yield client


def _account(test_db: TestDatabase, name: str) -> Account:
    user = create_user(test_db.session, name=name)
    account = Account(user, create_token(test_db.session, user))
    test_db.session.commit()  # the app's sessions must see the user and the token
    return account


@pytest.fixture(name="alice")
def alice_fixture(test_db: TestDatabase) -> Account:
    return _account(test_db, "alice")


@pytest.fixture(name="bob")
def bob_fixture(test_db: TestDatabase) -> Account:
    return _account(test_db, "bob")


@dataclass
class Board:
    """Ids of the seeded digits leaderboard, by role."""

    standard: str
    robust: str
    augmented: str
    xss: str
    private: str
    flagged: str
    queued: str
    running: str
    failed: str
    cancelled: str


def attach_examples(test_db: TestDatabase, settings: Settings, submission_id: str) -> None:
    """Store example PNGs for ``submission_id`` as the worker does, and list them."""
    assert settings.storage_dir is not None
    examples = seed.write_examples(settings.storage_dir, submission_id)
    session = test_db.session
    evaluation = session.scalar(select(Evaluation).where(Evaluation.submission_id == submission_id))
    assert evaluation is not None
    evaluation.examples = examples
    session.commit()


@pytest.fixture(name="board")
def board_fixture(test_db: TestDatabase, settings: Settings, alice: Account, bob: Account) -> Board:
    s = test_db.session
    now = utcnow()
    standard = create_finished(
        s,
        alice.user,
        display_name="Standard CNN",
        is_baseline=True,
        paper_url="https://arxiv.org/abs/1712.02779",
        created_at=now - timedelta(days=3),
        evaluation=seed.evaluation_fields(0.95, 0.62, 0.21, 0.04, 0.94, 0.09, sensitivity=1.6),
    )
    robust = create_finished(
        s,
        bob.user,
        display_name="Worst-of-10 CNN",
        is_baseline=True,
        training_method=TrainingMethod.WORST_OF_K,
        architecture="small_cnn",
        created_at=now - timedelta(days=2),
        description="robust optimisation",
        evaluation=seed.evaluation_fields(0.93, 0.90, 0.83, 0.71, 0.93, 0.80, sensitivity=0.3),
    )
    augmented = create_finished(
        s,
        bob.user,
        display_name="Augmented CNN",
        training_method=TrainingMethod.AUGMENTATION,
        created_at=now - timedelta(days=1),
        evaluation=seed.evaluation_fields(0.96, 0.88, 0.70, 0.52, 0.95, 0.66, sensitivity=0.6),
    )
    xss = create_finished(
        s,
        alice.user,
        display_name=XSS_NAME,
        description=f"about {XSS_NAME}",
        training_method=TrainingMethod.OTHER,
        created_at=now,
        evaluation={"natural": 0.5, "grid": None, "grid_vote": None},
    )
    private = create_finished(
        s,
        alice.user,
        display_name="Secret model",
        is_public=False,
        evaluation=seed.evaluation_fields(0.99, 0.99, 0.99, 0.99, 0.99, 0.99),
    )
    flagged = create_finished(
        s,
        alice.user,
        display_name="Flagged model",
        is_flagged=True,
        evaluation={"natural": 0.99, "grid": 0.99},
    )
    queued = create_submission(s, alice.user, display_name="Queued model")
    running = create_submission(
        s,
        alice.user,
        display_name="Running model",
        status=SubmissionStatus.RUNNING,
        phase="grid",
        progress=0.42,
        forward_passes=123_456,
        eta_seconds=300.0,
        started_at=now,
    )
    failed = create_submission(
        s,
        alice.user,
        display_name="Failed model",
        status=SubmissionStatus.FAILED,
        message=f"The model returned 5 classes, the benchmark has 10. {XSS_NAME}",
        finished_at=now,
        attempts=1,
    )
    cancelled = create_submission(
        s, alice.user, display_name="Cancelled model", status=SubmissionStatus.CANCELLED,
        message="Cancelled by its owner before it started.", finished_at=now,
    )  # fmt: skip
    attach_examples(test_db, settings, standard.id)  # commits: the app sees the whole board
    return Board(
        standard=standard.id, robust=robust.id, augmented=augmented.id, xss=xss.id,
        private=private.id, flagged=flagged.id, queued=queued.id, running=running.id,
        failed=failed.id, cancelled=cancelled.id,
    )  # fmt: skip


def submission(test_db: TestDatabase, submission_id: str) -> Submission:
    found = test_db.session.get(Submission, submission_id)
    assert found is not None
    return found
