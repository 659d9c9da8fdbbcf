"""Passwords, secrets and roles (hub.core.security), and accounts on a real database."""

from __future__ import annotations

from datetime import timedelta

import pytest

from hub.accounts import (
    AccountError,
    authenticate,
    create_token,
    create_user,
    end_session,
    resolve_session,
    resolve_token,
    revoke_token,
    set_password,
    start_session,
)
from hub.core.db import make_engine, make_session_factory, upgrade
from hub.core.security import hash_password, role_allows, token_digest, verify_password
from hub.tables import ApiToken, User, WebSession


@pytest.mark.parametrize("role,needed,allowed", [
    ("viewer", "viewer", True), ("viewer", "reviewer", False), ("viewer", "admin", False),
    ("reviewer", "viewer", True), ("reviewer", "reviewer", True), ("reviewer", "admin", False),
    ("admin", "viewer", True), ("admin", "reviewer", True), ("admin", "admin", True),
    ("root", "viewer", False),
])
def test_roles_are_ordered(role: str, needed: str, allowed: bool) -> None:
    assert role_allows(role, needed) is allowed


def test_passwords_are_argon2id_hashed_and_verified() -> None:
    h = hash_password("a long passphrase")
    assert h.startswith("$argon2id$") and "a long passphrase" not in h
    assert verify_password(h, "a long passphrase")
    assert not verify_password(h, "a long passphrasE")
    assert not verify_password("not a hash", "x")
    with pytest.raises(ValueError, match="at least 10"):
        hash_password("short")


def test_accounts_sessions_and_tokens(db_url: str) -> None:
    engine = make_engine(db_url)
    upgrade(engine)
    sessions = make_session_factory(engine)
    try:
        with sessions.begin() as s:
            user = create_user(s, "rita", "first password", "reviewer")
            with pytest.raises(AccountError, match="already exists"):
                create_user(s, "rita", "other password", "viewer")
            with pytest.raises(AccountError, match="role"):
                create_user(s, "x", "long enough pw", "superuser")
        with sessions.begin() as s:
            assert authenticate(s, "rita", "first password") is not None
            assert authenticate(s, "rita", "wrong password") is None
            assert authenticate(s, "nobody", "first password") is None
            secret, csrf = start_session(s, user)
            expired, _ = start_session(s, user, ttl=timedelta(seconds=-1))
            token = create_token(s, "rita", "ci")
        with sessions.begin() as s:
            p = resolve_session(s, secret)
            assert p is not None and (p.username, p.role, p.via, p.csrf_token) == ("rita", "reviewer", "session", csrf)
            assert resolve_session(s, expired) is None
            assert resolve_session(s, "forged") is None
            stored = {w.token_sha256 for w in s.query(WebSession)} | {t.token_sha256 for t in s.query(ApiToken)}
            assert token_digest(secret) in stored and secret not in stored and token not in stored
            t = resolve_token(s, token)
            assert t is not None and t.via == "token"
            revoke_token(s, s.query(ApiToken).one().id)
        with sessions.begin() as s:
            assert resolve_token(s, token) is None
            set_password(s, "rita", "second password")  # ends every session
        with sessions.begin() as s:
            assert resolve_session(s, secret) is None
            assert authenticate(s, "rita", "second password") is not None
            end_session(s, "whatever")  # unknown session: nothing to do
            s.query(User).filter_by(username="rita").one().active = False
        with sessions.begin() as s:
            assert authenticate(s, "rita", "second password") is None
    finally:
        engine.dispose()
