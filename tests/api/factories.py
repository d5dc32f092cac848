"""The factories of `tests.factories`, each followed by a commit, for the tests that still
import them from here (tests/pages/ and tests/api/test_leaderboard.py) and rely on the commit
to show their rows to the app. Delete this module once those tests import `tests.factories`
and commit for themselves."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from db.models import Evaluation, Submission, User
from tests import factories

__all__ = [
    "create_user",
    "create_token",
    "create_submission",
    "create_evaluation",
    "create_finished",
]


def create_user(session: Session, **overrides: Any) -> User:
    user = factories.create_user(session, **overrides)
    session.commit()
    return user


def create_token(session: Session, user: User, name: str = "test") -> str:
    plain = factories.create_token(session, user, name)
    session.commit()
    return plain


def create_submission(session: Session, owner: User | None = None, **overrides: Any) -> Submission:
    submission = factories.create_submission(session, owner, **overrides)
    session.commit()
    return submission


def create_evaluation(session: Session, submission: Submission, **overrides: Any) -> Evaluation:
    evaluation = factories.create_evaluation(session, submission, **overrides)
    session.commit()
    return evaluation


def create_finished(session: Session, owner: User | None = None, **overrides: Any) -> Submission:
    submission = factories.create_finished(session, owner, **overrides)
    session.commit()
    return submission
