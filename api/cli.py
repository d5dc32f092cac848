"""Admin commands, merged into ``spatialbench``: ``users``, ``tokens`` and ``db``.

    spatialbench db upgrade
    spatialbench users create alice [--admin]      # prints alice's first token
    spatialbench tokens create alice --label laptop
    spatialbench tokens revoke sb_AbCdEfGh         # the whole token or its printed prefix

Tokens go to stdout alone (``TOKEN=$(spatialbench users create alice)``); everything else to
stderr. In the embedded (SQLite) mode the commands bring the schema up to date first.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, TypeVar

import typer
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from api.errors import ApiError
from api.services.users import create_token, create_user, get_user, revoke_token
from config.settings import Settings, get_settings
from db.models import ApiToken, User
from db.session import session_scope

app = typer.Typer(no_args_is_help=True)
users_app = typer.Typer(help="Users of the API and their limits.", no_args_is_help=True)
tokens_app = typer.Typer(help="API tokens (bearer tokens, stored hashed).", no_args_is_help=True)
db_app = typer.Typer(help="The database schema (Alembic migrations).", no_args_is_help=True)
app.add_typer(users_app, name="users")
app.add_typer(tokens_app, name="tokens")
app.add_typer(db_app, name="db")

T = TypeVar("T")


def _err(message: str) -> None:
    typer.echo(message, err=True)


def _run(settings: Settings, work: Callable[[Session], T]) -> T:
    """``work`` in one transaction; an ``ApiError`` becomes a message and exit status 1."""
    if settings.migrate_on_start:
        from db.migrate import upgrade

        assert settings.database_url is not None
        upgrade(settings.database_url)
    try:
        with session_scope(settings) as session:
            return work(session)
    except ApiError as exc:
        _err(f"error: {exc.detail}")
        raise typer.Exit(1) from None


@db_app.command("upgrade")
def db_upgrade(
    revision: Annotated[str, typer.Argument(help="Target revision.")] = "head",
    url: Annotated[str | None, typer.Option(help="Database URL (default: the settings').")] = None,
) -> None:
    """Bring the database schema up to date (run once per deploy, before the API starts)."""
    from db.migrate import upgrade

    target = url or get_settings().database_url
    assert target is not None
    upgrade(target, revision)
    _err(f"database at revision {revision}")


@users_app.command("create")
def users_create(
    name: str,
    admin: Annotated[bool, typer.Option("--admin", help="May exceed the caps.")] = False,
    daily_limit: Annotated[int | None, typer.Option(help="Submissions per 24 h.")] = None,
    concurrent_limit: Annotated[int | None, typer.Option(help="Queued or running at once.")] = None,
) -> None:
    """Create a user and print its first API token (shown once)."""

    def work(session: Session) -> str:
        user = create_user(
            session,
            name,
            is_admin=admin,
            daily_limit=daily_limit,
            concurrent_limit=concurrent_limit,
        )
        return create_token(session, user)[1]

    token = _run(get_settings(), work)
    _err(f"created user {name!r}{' (admin)' if admin else ''}; its API token (shown once):")
    typer.echo(token)


@users_app.command("list")
def users_list() -> None:
    """The users, with their active token count."""

    def work(session: Session) -> list[tuple[User, int]]:
        active = (
            select(func.count())
            .where(ApiToken.user_id == User.id, ApiToken.revoked_at.is_(None))
            .scalar_subquery()
        )
        return [(u, int(n)) for u, n in session.execute(select(User, active).order_by(User.name))]

    for user, n_tokens in _run(get_settings(), work):
        flags = " admin" if user.is_admin else ""
        typer.echo(f"{user.name}{flags}  tokens={n_tokens}")


@tokens_app.command("create")
def tokens_create(
    name: Annotated[str, typer.Argument(help="The user the token is for.")],
    label: Annotated[str, typer.Option(help="A name for the token, e.g. the machine.")] = "cli",
) -> None:
    """Create another token for an existing user and print it (shown once)."""

    def work(session: Session) -> str:
        return create_token(session, get_user(session, name), label)[1]

    token = _run(get_settings(), work)
    _err(f"new API token for {name!r} (shown once):")
    typer.echo(token)


@tokens_app.command("revoke")
def tokens_revoke(
    token_or_prefix: Annotated[str, typer.Argument(help="The token, or its first characters.")],
) -> None:
    """Revoke a token; requests with it get 401 from now on."""

    def work(session: Session) -> str:
        token = revoke_token(session, token_or_prefix)
        return f"revoked token {token.prefix}... ({token.name!r}) of {token.user.name!r}"

    _err(_run(get_settings(), work))


@tokens_app.command("list")
def tokens_list(
    name: Annotated[str | None, typer.Argument(help="Only this user's.")] = None,
) -> None:
    """Tokens by prefix, with their user, creation, last use and revocation."""

    def work(session: Session) -> list[str]:
        query = select(ApiToken, User.name).join(User).order_by(User.name, ApiToken.created_at)
        if name is not None:
            query = query.where(User.name == name)
        lines = []
        for token, user_name in session.execute(query):
            state = "revoked" if token.revoked_at else "active"
            used = token.last_used_at.isoformat(timespec="seconds") if token.last_used_at else "-"
            lines.append(f"{token.prefix}...  {user_name}  {token.name}  {state}  last used {used}")
        return lines

    for line in _run(get_settings(), work):
        typer.echo(line)
