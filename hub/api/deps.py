"""Request dependencies: the database session, who is asking, what they may do, CSRF.

- A request is authenticated by the ``lg_session`` cookie (the UI) or an
  ``Authorization: Bearer lgt_...`` header (scripts). Anything else is refused: 401 for the API,
  a redirect to ``/login`` for pages.
- Permission checks are dependencies: ``Depends(require("reviewer"))``.
- CSRF: a state-changing request authenticated by the cookie must carry the session's CSRF
  token, in the ``X-CSRF-Token`` header (JavaScript) or the ``csrf_token`` form field (forms);
  compared in constant time. Bearer-token requests carry no ambient credential and need none.
  The cookie is also ``SameSite=Lax`` and ``HttpOnly``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from hub.accounts import Principal, resolve_session, resolve_token
from hub.api.context import HubContext
from hub.core.security import constant_time_equal, role_allows

__all__ = [
    "SESSION_COOKIE",
    "CurrentUser",
    "Db",
    "LoginRequired",
    "check_csrf",
    "get_context",
    "get_db",
    "optional_principal",
    "require",
]

log = logging.getLogger(__name__)

SESSION_COOKIE = "lg_session"
UNSAFE = {"POST", "PUT", "PATCH", "DELETE"}


class LoginRequired(Exception):
    """Raised for pages (not the API): the app turns it into a redirect to /login."""

    def __init__(self, next_url: str) -> None:
        self.next_url = next_url


def get_context(request: Request) -> HubContext:
    ctx: HubContext = request.app.state.ctx
    return ctx


def get_db(request: Request, ctx: Annotated[HubContext, Depends(get_context)]) -> Iterator[Session]:
    factory = ctx.read_sessions if ctx.read_sessions is not None and request.method in ("GET", "HEAD") \
        else ctx.sessions
    with factory() as s:
        yield s


Db = Annotated[Session, Depends(get_db)]


def optional_principal(request: Request, db: Db) -> Principal | None:
    auth = request.headers.get("authorization", "")
    if auth:
        scheme, _, secret = auth.partition(" ")
        if scheme.lower() != "bearer" or not secret:
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, "use 'Authorization: Bearer <token>'",
                                headers={"WWW-Authenticate": "Bearer"})
        p = resolve_token(db, secret.strip())
        if db.dirty:
            try:
                db.commit()  # last_used_at, at most once a minute per token
            except OperationalError:  # a read-only request lost the write race: last_used_at can wait
                db.rollback()
                log.debug("token last_used_at not updated (database busy)")
        if p is None:
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, "invalid or revoked token",
                                headers={"WWW-Authenticate": "Bearer"})
        return p
    cookie = request.cookies.get(SESSION_COOKIE)
    return resolve_session(db, cookie) if cookie else None


def _is_api(request: Request) -> bool:
    return request.url.path.startswith("/api/")


async def check_csrf(request: Request, principal: Principal) -> None:
    if request.method not in UNSAFE or principal.via != "session":
        return
    sent = request.headers.get("x-csrf-token")
    if sent is None and request.headers.get("content-type", "").startswith(
            ("application/x-www-form-urlencoded", "multipart/form-data")):
        form = await request.form()
        value = form.get("csrf_token")
        sent = value if isinstance(value, str) else None
    if not sent or principal.csrf_token is None or not constant_time_equal(sent, principal.csrf_token):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "missing or wrong CSRF token")


def require(role: str) -> Callable[..., object]:
    """A dependency: the principal, if it has at least ``role``; 401/403 (or a login redirect) otherwise."""

    async def dep(request: Request, principal: Annotated[Principal | None, Depends(optional_principal)]) -> Principal:
        if principal is None:
            if _is_api(request):
                raise HTTPException(status.HTTP_401_UNAUTHORIZED, "log in or send a bearer token",
                                    headers={"WWW-Authenticate": "Bearer"})
            raise LoginRequired(str(request.url.path) + (f"?{request.url.query}" if request.url.query else ""))
        await check_csrf(request, principal)
        if not role_allows(principal.role, role):
            raise HTTPException(status.HTTP_403_FORBIDDEN, f"needs the {role} role (you are {principal.role})")
        request.state.principal = principal
        return principal

    dep.__name__ = f"require_{role}"
    return dep


CurrentUser = Annotated[Principal, Depends(require("viewer"))]
