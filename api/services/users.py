"""Users and their API tokens.

A token is ``sb_`` plus 43 URL-safe random characters. Only its sha256 is stored, with its
first characters (``prefix``) so that an operator can name it in ``spatialbench tokens
revoke``; the plain token is returned once, by ``create_token``.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session, joinedload, selectinload

from api.errors import Conflict, InvalidInput, NotFound, Unauthorized
from db.models import ApiToken, User, utcnow

__all__ = [
    "TOKEN_PREFIX",
    "authenticate",
    "create_token",
    "create_user",
    "get_user",
    "hash_token",
    "revoke_token",
]

TOKEN_PREFIX = "sb_"
# Characters of the token stored in clear, to tell tokens apart (not enough to guess one).
PREFIX_LENGTH = 12
# Writing last_used_at on every request would turn every read into a write.
LAST_USED_RESOLUTION = timedelta(minutes=1)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def create_user(
    session: Session,
    name: str,
    *,
    is_admin: bool = False,
    daily_limit: int | None = None,
    concurrent_limit: int | None = None,
) -> User:
    """A new user; ``Conflict`` if the name is taken. Limits None mean the settings' defaults."""
    name = name.strip()
    if not name or len(name) > 64:
        raise InvalidInput("A user name is 1 to 64 characters.")
    if session.scalar(select(User.id).where(User.name == name)) is not None:
        raise Conflict(f"A user named {name!r} already exists.")
    user = User(
        name=name,
        is_admin=is_admin,
        daily_limit=daily_limit,
        concurrent_limit=concurrent_limit,
    )
    session.add(user)
    session.flush()
    return user


def get_user(session: Session, name: str) -> User:
    user = session.scalar(select(User).where(User.name == name))
    if user is None:
        raise NotFound(f"No user named {name!r}.")
    return user


def create_token(session: Session, user: User, name: str = "default") -> tuple[ApiToken, str]:
    """A new token for ``user``: the row, and the plain token (shown once, never stored)."""
    plain = TOKEN_PREFIX + secrets.token_urlsafe(32)
    token = ApiToken(
        user_id=user.id,
        token_hash=hash_token(plain),
        prefix=plain[:PREFIX_LENGTH],
        name=name,
    )
    session.add(token)
    session.flush()
    return token, plain


def revoke_token(session: Session, token_or_prefix: str) -> ApiToken:
    """Revoke the token given in full or by its prefix (as ``tokens create`` printed it).

    ``NotFound`` when nothing matches, ``Conflict`` when a prefix matches several tokens.
    Revoking a revoked token is allowed and changes nothing.
    """
    value = token_or_prefix.strip()
    if len(value) < 6:
        raise InvalidInput("Give the whole token or at least its first 6 characters.")
    query = select(ApiToken).options(selectinload(ApiToken.user))
    exact = session.scalar(query.where(ApiToken.token_hash == hash_token(value)))
    if exact is not None:
        matches = [exact]
    elif len(value) <= PREFIX_LENGTH:
        matches = list(
            session.scalars(query.where(ApiToken.prefix.startswith(value, autoescape=True)))
        )
    else:
        matches = []  # longer than a prefix, and not a token we know
    if not matches:
        raise NotFound("No token matches that value.")
    if len(matches) > 1:
        raise Conflict(
            f"{len(matches)} tokens start with {value!r}; give more characters or the whole token."
        )
    token = matches[0]
    if token.revoked_at is None:
        token.revoked_at = utcnow()
        session.flush()
    return token


def authenticate(session: Session, token: str, now: datetime | None = None) -> User:
    """The user a bearer token belongs to; ``Unauthorized`` if unknown or revoked.

    Records the time of use (at most once a minute per token).
    """
    row = session.scalar(
        select(ApiToken)
        .options(joinedload(ApiToken.user))
        .where(ApiToken.token_hash == hash_token(token))
    )
    if row is None:
        raise Unauthorized(
            "Unknown API token. Ask the operator for one (spatialbench users create NAME)."
        )
    if row.revoked_at is not None:
        raise Unauthorized("This API token was revoked; ask the operator for a new one.")
    now = now or utcnow()
    last = row.last_used_at
    if last is None or now - last >= LAST_USED_RESOLUTION:
        row.last_used_at = now
        session.flush()
    return row.user
