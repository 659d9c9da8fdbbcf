"""Passwords, tokens and roles.

- Passwords are hashed with argon2id (``argon2-cffi``'s defaults: RFC 9106 low-memory profile);
  a hash made with older parameters is re-hashed at the next successful login.
- API tokens and session cookies are 32 random bytes (``secrets``), shown once; the database
  keeps only their SHA-256, so a leaked database does not leak a usable credential.
- Roles are ordered: ``viewer`` < ``reviewer`` < ``admin``; a role can do what the ones below
  it can (:func:`role_allows`).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from hub.tables import ROLES

__all__ = [
    "MIN_PASSWORD_LENGTH",
    "ROLES",
    "TOKEN_PREFIX",
    "constant_time_equal",
    "hash_password",
    "needs_rehash",
    "new_secret",
    "role_allows",
    "token_digest",
    "validate_password",
    "verify_password",
]

MIN_PASSWORD_LENGTH = 10
TOKEN_PREFIX = "lgt_"  # API tokens; makes a leaked one easy to grep for
_hasher = PasswordHasher()


def validate_password(password: str) -> None:
    """Raise ValueError when ``password`` is too weak to be set."""
    if len(password) < MIN_PASSWORD_LENGTH:
        raise ValueError(f"a password needs at least {MIN_PASSWORD_LENGTH} characters")
    if password.strip() != password:
        raise ValueError("a password may not start or end with whitespace")


def hash_password(password: str) -> str:
    validate_password(password)
    return _hasher.hash(password)


def verify_password(stored_hash: str, password: str) -> bool:
    try:
        return _hasher.verify(stored_hash, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def needs_rehash(stored_hash: str) -> bool:
    return _hasher.check_needs_rehash(stored_hash)


def new_secret(prefix: str = "") -> str:
    """A fresh random credential (256 bits, URL-safe)."""
    return prefix + secrets.token_urlsafe(32)


def token_digest(secret: str) -> str:
    """What the database stores of a token or session cookie."""
    return hashlib.sha256(secret.encode()).hexdigest()


def constant_time_equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def role_allows(role: str, needed: str) -> bool:
    """Whether ``role`` may do what ``needed`` may (roles are ordered, see :data:`ROLES`)."""
    if needed not in ROLES:
        raise ValueError(f"unknown role {needed!r}; expected one of {ROLES}")
    return role in ROLES and ROLES.index(role) >= ROLES.index(needed)
