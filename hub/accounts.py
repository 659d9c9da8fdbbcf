"""Accounts: users, API tokens and UI sessions, on top of :mod:`hub.core.security`.

Every function takes an open :class:`~sqlalchemy.orm.Session` and leaves committing to the
caller, except where noted. Errors a person can fix raise :class:`AccountError` with a message
meant for them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from hub.core.security import (
    ROLES,
    TOKEN_PREFIX,
    hash_password,
    needs_rehash,
    new_secret,
    token_digest,
    verify_password,
)
from hub.tables import ApiToken, User, WebSession
from lineguard_contract.topics import SEGMENT_PATTERN

__all__ = [
    "AccountError",
    "Principal",
    "authenticate",
    "create_token",
    "create_user",
    "end_session",
    "resolve_session",
    "resolve_token",
    "revoke_token",
    "set_password",
    "start_session",
]

SESSION_TTL = timedelta(hours=12)
LAST_USED_EVERY = timedelta(minutes=1)  # resolution of api_tokens.last_used_at
_DUMMY_HASH = hash_password("not-a-real-password-0")  # equalizes login timing for unknown users


class AccountError(ValueError):
    pass


@dataclass(frozen=True)
class Principal:
    """Who is making a request: the user, and how they proved it."""

    user_id: int
    username: str
    role: str
    via: str  # "session" | "token"
    csrf_token: str | None = None  # sessions only


def _now() -> datetime:
    return datetime.now(UTC)


def _as_utc(ts: datetime) -> datetime:
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts  # SQLite returns naive UTC


def create_user(s: Session, username: str, password: str, role: str) -> User:
    import re

    if not re.match(SEGMENT_PATTERN, username):
        raise AccountError(f"username {username!r}: use 1-64 letters, digits, '_', '.', '-'")
    if role not in ROLES:
        raise AccountError(f"role {role!r}: expected one of {', '.join(ROLES)}")
    if s.scalar(select(User.id).where(User.username == username)) is not None:
        raise AccountError(f"user {username!r} already exists")
    try:
        pw_hash = hash_password(password)
    except ValueError as e:
        raise AccountError(str(e)) from None
    user = User(username=username, password_hash=pw_hash, role=role, active=True, created_at=_now())
    s.add(user)
    s.flush()
    return user


def set_password(s: Session, username: str, password: str) -> None:
    user = s.scalar(select(User).where(User.username == username))
    if user is None:
        raise AccountError(f"no user {username!r}")
    try:
        user.password_hash = hash_password(password)
    except ValueError as e:
        raise AccountError(str(e)) from None
    s.execute(delete(WebSession).where(WebSession.user_id == user.id))  # log out everywhere


def authenticate(s: Session, username: str, password: str) -> User | None:
    """The active user with these credentials, or None (same work done either way)."""
    user = s.scalar(select(User).where(User.username == username))
    if user is None or not user.active:
        verify_password(_DUMMY_HASH, password)
        return None
    if not verify_password(user.password_hash, password):
        return None
    if needs_rehash(user.password_hash):
        user.password_hash = hash_password(password)
    return user


def start_session(s: Session, user: User, ttl: timedelta = SESSION_TTL) -> tuple[str, str]:
    """A new UI session for ``user``: ``(cookie secret, csrf token)``."""
    secret, csrf = new_secret(), new_secret()
    now = _now()
    s.execute(delete(WebSession).where(WebSession.expires_at < now))  # housekeeping
    s.add(WebSession(token_sha256=token_digest(secret), user_id=user.id, csrf_token=csrf,
                     created_at=now, expires_at=now + ttl))
    return secret, csrf


def resolve_session(s: Session, secret: str) -> Principal | None:
    row = s.execute(
        select(WebSession, User).join(User, User.id == WebSession.user_id)
        .where(WebSession.token_sha256 == token_digest(secret))
    ).first()
    if row is None:
        return None
    ws, user = row
    if _as_utc(ws.expires_at) <= _now() or not user.active:
        return None
    return Principal(user.id, user.username, user.role, "session", ws.csrf_token)


def end_session(s: Session, secret: str) -> None:
    s.execute(delete(WebSession).where(WebSession.token_sha256 == token_digest(secret)))


def create_token(s: Session, username: str, name: str) -> str:
    """A new API token acting as ``username``; the secret is returned once and never stored."""
    user = s.scalar(select(User).where(User.username == username))
    if user is None:
        raise AccountError(f"no user {username!r}")
    if not name or len(name) > 64:
        raise AccountError("a token needs a name of 1-64 characters")
    secret = new_secret(TOKEN_PREFIX)
    s.add(ApiToken(user_id=user.id, name=name, token_sha256=token_digest(secret), created_at=_now()))
    return secret


def resolve_token(s: Session, secret: str) -> Principal | None:
    row = s.execute(
        select(ApiToken, User).join(User, User.id == ApiToken.user_id)
        .where(ApiToken.token_sha256 == token_digest(secret))
    ).first()
    if row is None:
        return None
    tok, user = row
    if tok.revoked_at is not None or not user.active:
        return None
    now = _now()
    if tok.last_used_at is None or now - _as_utc(tok.last_used_at) > LAST_USED_EVERY:
        tok.last_used_at = now  # not on every request: a script's calls would all become writes
    return Principal(user.id, user.username, user.role, "token")


def revoke_token(s: Session, token_id: int) -> None:
    tok = s.get(ApiToken, token_id)
    if tok is None:
        raise AccountError(f"no token {token_id}")
    tok.revoked_at = _now()
