"""``/api/v1/fleet``, ``/api/v1/models``, ``/api/v1/stats/defects``, ``/api/v1/classes``,
``/api/v1/dead-letters``: what the fleet, models and charts pages show, and the class list."""

from __future__ import annotations

from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, status
from sqlalchemy import select

from hub.accounts import Principal
from hub.api.deps import CurrentUser, Db, require
from hub.fleet import defect_series, list_agents, model_versions
from hub.review import ReviewError, add_class, known_classes
from hub.schemas import ClassIn
from hub.tables import DeadLetter

__all__ = ["router"]

router = APIRouter(prefix="/api/v1", tags=["fleet"])


@router.get("/fleet")
def fleet(db: Db, _: CurrentUser) -> list[dict[str, Any]]:
    return [asdict(a) for a in list_agents(db)]


@router.get("/models")
def models(db: Db, _: CurrentUser) -> list[dict[str, Any]]:
    return model_versions(db)


@router.get("/stats/defects")
def defects(db: Db, _: CurrentUser, days: Annotated[float, Query(gt=0, le=366)] = 7,
            bucket: Literal["hour", "day"] = "hour") -> list[dict[str, Any]]:
    since = datetime.now(UTC) - timedelta(days=days)
    return [asdict(p) for p in defect_series(db, since, bucket)]


@router.get("/classes")
def classes(db: Db, _: CurrentUser) -> list[str]:
    return known_classes(db)


@router.post("/classes", status_code=status.HTTP_201_CREATED)
def create_class(body: ClassIn, db: Db, who: Annotated[Principal, Depends(require("reviewer"))]) -> list[str]:
    try:
        add_class(db, body.name, who.username)
    except ReviewError as e:
        db.rollback()
        raise HTTPException(status.HTTP_409_CONFLICT, str(e)) from None
    db.commit()
    return known_classes(db)  # add_class refreshed the cache


@router.get("/dead-letters")
def dead_letters(db: Db, _: Annotated[Principal, Depends(require("admin"))],
                 limit: Annotated[int, Query(ge=1, le=500)] = 100) -> list[dict[str, Any]]:
    rows = db.scalars(select(DeadLetter).order_by(DeadLetter.id.desc()).limit(limit))
    return [{"topic": r.topic, "received_at": r.received_at, "reason": r.reason, "detail": r.detail,
             "payload_size": r.payload_size, "payload_sha256": r.payload_sha256} for r in rows]
