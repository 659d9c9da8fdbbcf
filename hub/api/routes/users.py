"""``/api/v1/users`` and ``/api/v1/tokens``: accounts (admins) and API tokens."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, status
from sqlalchemy import select

from hub.accounts import AccountError, Principal, create_token, create_user
from hub.api.deps import Db, require
from hub.schemas import TokenIn, TokenOut, UserIn, UserOut
from hub.tables import User

__all__ = ["router"]

router = APIRouter(prefix="/api/v1", tags=["accounts"])
Admin = Annotated[Principal, Depends(require("admin"))]


@router.get("/users", response_model=list[UserOut])
def users(db: Db, _: Admin) -> list[UserOut]:
    return [UserOut(username=u.username, role=u.role, active=u.active, created_at=u.created_at)
            for u in db.scalars(select(User).order_by(User.username))]


@router.post("/users", response_model=UserOut, status_code=status.HTTP_201_CREATED)
def add_user(body: UserIn, db: Db, _: Admin) -> UserOut:
    try:
        u = create_user(db, body.username, body.password, body.role)
    except AccountError as e:
        db.rollback()
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(e)) from None
    db.commit()
    return UserOut(username=u.username, role=u.role, active=u.active, created_at=u.created_at)


@router.post("/tokens", response_model=TokenOut, status_code=status.HTTP_201_CREATED)
def add_token(body: TokenIn, db: Db, who: Annotated[Principal, Depends(require("viewer"))]) -> TokenOut:
    username = body.username or who.username
    if username != who.username and who.role != "admin":
        raise HTTPException(status.HTTP_403_FORBIDDEN, "only admins create tokens for other users")
    try:
        secret = create_token(db, username, body.name)
    except AccountError as e:
        db.rollback()
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(e)) from None
    db.commit()
    return TokenOut(name=body.name, username=username, token=secret)
