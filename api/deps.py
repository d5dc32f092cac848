"""The API's dependencies, as ``Annotated`` aliases so route signatures stay short.

- ``SettingsDep``: the app's settings.
- ``SessionDep``: the request's session. It owns the transaction: it commits when the route
  returns, before the response is sent (``scope="function"``), and rolls back on any error.
  Background tasks (the enqueue) run after the response, so after the commit.
- ``CurrentUser`` / ``OptionalUser``: the user of the bearer token (401 when it is missing,
  unknown or revoked; ``OptionalUser`` is None without a token).
- ``SubmissionDep``: the submission of the path's ``submission_id``; 404 when it does not
  exist or is private and not the caller's.
- ``StorageDep``: the app's storage of models and example images (one per process, made by
  ``create_app`` from the settings).
- ``EnqueuerDep``: hands a submission id to the workers through the app's producer, built
  from the app's settings (tests override ``get_enqueuer``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from api.errors import Unauthorized
from api.services.submissions import get_submission
from api.services.users import authenticate
from config.settings import Settings
from db.models import Submission, User
from db.session import Database, transaction
from storage import Storage

__all__ = [
    "CurrentUser",
    "DatabaseDep",
    "Enqueuer",
    "EnqueuerDep",
    "OptionalUser",
    "SessionDep",
    "SettingsDep",
    "StorageDep",
    "SubmissionDep",
    "base_url",
    "get_enqueuer",
    "get_session",
]

log = logging.getLogger(__name__)


# The two lookups below are `async` so FastAPI calls them inline: a plain `def` dependency
# costs a hop to the thread pool, on every request.
async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


SettingsDep = Annotated[Settings, Depends(get_settings)]


async def get_storage(request: Request) -> Storage:
    return request.app.state.storage


StorageDep = Annotated[Storage, Depends(get_storage)]


async def get_database(request: Request) -> Database:
    return request.app.state.database


DatabaseDep = Annotated[Database, Depends(get_database)]


def get_session(database: DatabaseDep) -> Iterator[Session]:
    with transaction(database.sessions) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session, scope="function")]

_bearer = HTTPBearer(
    auto_error=False,
    description="An API token from `spatialbench users create NAME` or `tokens create NAME`.",
)


def get_optional_user(
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> User | None:
    if credentials is None:
        return None
    return authenticate(session, credentials.credentials)


OptionalUser = Annotated[User | None, Depends(get_optional_user)]


def get_current_user(user: OptionalUser) -> User:
    if user is None:
        raise Unauthorized(
            "This needs an API token: send the header 'Authorization: Bearer <token>'. An "
            "operator creates one with `spatialbench users create NAME`."
        )
    return user


CurrentUser = Annotated[User, Depends(get_current_user)]


def load_submission(submission_id: str, session: SessionDep, viewer: OptionalUser) -> Submission:
    return get_submission(session, submission_id, viewer)


SubmissionDep = Annotated[Submission, Depends(load_submission)]

Enqueuer = Callable[[str], None]


def get_enqueuer(request: Request) -> Enqueuer:
    """The app's producer (``worker.queue.Producer``, made from the app's own settings)."""
    return request.app.state.enqueuer


EnqueuerDep = Annotated[Enqueuer, Depends(get_enqueuer)]


def enqueue_after_commit(enqueue: Enqueuer, submission_id: str) -> None:
    """Run as a background task, after the response (so after the commit)."""
    try:
        enqueue(submission_id)
    except Exception:
        # The row stays queued; the reaper publishes it again after republish_after_s.
        log.exception("could not enqueue submission %s", submission_id)


def base_url(request: Request) -> str:
    return str(request.base_url).rstrip("/")
