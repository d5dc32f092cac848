"""Small typed factories for every test: rows with sensible defaults, any field overridable.

They flush, never commit, as the service functions do: a row gets its id and defaults and is
seen by the session that made it. A test whose rows must be seen by another session (the
app's, a worker's) commits itself; on Postgres that only releases a savepoint of the test's
rolled-back transaction (`tests.fixtures_db`).
"""

from __future__ import annotations

import hashlib
import uuid
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from api.services.users import create_token as _create_token
from db.models import Evaluation, Submission, SubmissionStatus, User, utcnow
from evaluator.vocabulary import ModelFormat, TrainingMethod


def create_user(session: Session, **overrides: Any) -> User:
    values: dict[str, Any] = {"name": f"user-{uuid.uuid4().hex[:8]}", "is_admin": False}
    values.update(overrides)
    user = User(**values)
    session.add(user)
    session.flush()
    return user


def create_token(session: Session, user: User, name: str = "test") -> str:
    """A new token for ``user``; returns the plain token."""
    return _create_token(session, user, name)[1]


def auth(token: str) -> dict[str, str]:
    """The request headers that present ``token``."""
    return {"Authorization": f"Bearer {token}"}


def create_submission(session: Session, owner: User | None = None, **overrides: Any) -> Submission:
    """A queued public submission of ``small_cnn`` weights on digits, owned by ``owner`` (a new
    user when None); its file hash is random, so no two are duplicates."""
    owner = owner or create_user(session)
    values: dict[str, Any] = {
        "owner_id": owner.id,
        "display_name": "A model",
        "benchmark": "digits",
        "model_format": ModelFormat.SAFETENSORS,
        "architecture": "small_cnn",
        "training_method": TrainingMethod.STANDARD,
        "file_sha256": hashlib.sha256(uuid.uuid4().bytes).hexdigest(),
        "file_size": 1234,
        "status": SubmissionStatus.QUEUED,
        "is_public": True,
    }
    values.update(overrides)
    submission = Submission(**values)
    session.add(submission)
    session.flush()
    return submission


def create_evaluation(session: Session, submission: Submission, **overrides: Any) -> Evaluation:
    values: dict[str, Any] = {
        "submission_id": submission.id,
        "benchmark": submission.benchmark,
        "natural": 0.9,
        "random": 0.6,
        "worst_of_k": 0.3,
        "grid": 0.1,
        "vote_natural": 0.88,
        "grid_vote": 0.2,
        "images": 540,
        "metrics": {"natural": {"accuracy": 0.9, "correct": 486, "total": 540}},
        "landscape": {"shape": [31, 5, 5]},
        "forward_passes": 1000,
        "wall_time_s": 1.5,
        "device": "cpu",
        "seed": 0,
        "versions": {"torch": "2"},
        "config": {},
        "cost": {},
    }
    values.update(overrides)
    evaluation = Evaluation(**values)
    session.add(evaluation)
    session.flush()
    return evaluation


def create_finished(
    session: Session,
    owner: User | None = None,
    *,
    finished_at: datetime | None = None,
    evaluation: dict[str, Any] | None = None,
    **overrides: Any,
) -> Submission:
    """A finished submission with its evaluation (metrics overridable via ``evaluation``)."""
    submission = create_submission(
        session,
        owner,
        status=SubmissionStatus.FINISHED,
        progress=1.0,
        finished_at=finished_at or utcnow(),
        **overrides,
    )
    create_evaluation(session, submission, **(evaluation or {}))
    return submission
