"""``/api/v1/samples``: the review queue, one sample, its image, and review actions."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query, Response, status
from sqlalchemy.orm import Session

from hub.accounts import Principal
from hub.api.context import HubContext
from hub.api.deps import CurrentUser, Db, get_context, require
from hub.review import QueueFilter, ReviewError, apply_review, get_sample, history, list_samples
from hub.schemas import ReviewIn, SampleDetail, SamplePage, SampleSummary
from hub.tables import Sample

__all__ = ["router", "queue_filter", "review_sample"]

router = APIRouter(prefix="/api/v1/samples", tags=["samples"])


def queue_filter(site: str | None = None, line: str | None = None, station: str | None = None,
                 camera: str | None = None, cls: str | None = None,
                 status_: Annotated[str | None, Query(alias="status")] = None, reason: str | None = None,
                 min_score: Annotated[float | None, Query(ge=0, le=1)] = None,
                 max_score: Annotated[float | None, Query(ge=0, le=1)] = None,
                 since: datetime | None = None, until: datetime | None = None) -> QueueFilter:
    try:
        return QueueFilter(site=site or None, line=line or None, station=station or None, camera=camera or None,
                           cls=cls or None, status=status_ or None, reason=reason or None, min_score=min_score,
                           max_score=max_score, since=since, until=until)
    except ReviewError as e:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(e)) from None


Filter = Annotated[QueueFilter, Depends(queue_filter)]


@router.get("", response_model=SamplePage)
def list_(db: Db, _: CurrentUser, flt: Filter, page: Annotated[int, Query(ge=1)] = 1,
          page_size: Annotated[int, Query(ge=1, le=200)] = 50) -> SamplePage:
    p = list_samples(db, flt, page, page_size)
    return SamplePage(items=[SampleSummary.of(s) for s in p.items], page=p.page, page_size=p.page_size,
                      pages=p.pages, total=p.total, total_capped=p.total_capped)


def _sample_or_404(db: Session, sample_id: str) -> Sample:
    s = get_sample(db, sample_id)
    if s is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no sample {sample_id}")
    return s


@router.get("/{sample_id}", response_model=SampleDetail)
def detail(sample_id: str, db: Db, _: CurrentUser) -> SampleDetail:
    s = _sample_or_404(db, sample_id)
    return SampleDetail.full(s, history(db, s))


@router.get("/{sample_id}/image", response_class=Response,
            responses={200: {"content": {"image/jpeg": {}}}})
def image(sample_id: str, db: Db, _: CurrentUser, ctx: Annotated[HubContext, Depends(get_context)]) -> Response:
    s = _sample_or_404(db, sample_id)
    try:
        data = ctx.blobs.get(s.image_sha256)
    except KeyError:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"the image of {sample_id} is missing") from None
    return Response(data, media_type="image/jpeg",
                    headers={"Cache-Control": "private, max-age=86400, immutable", "ETag": f'"{s.image_sha256}"'})


def review_sample(db: Session, ctx: HubContext, who: Principal, sample_id: str, body: ReviewIn) -> Sample:
    """Shared by the API and the UI's form posts."""
    s = _sample_or_404(db, sample_id)
    try:
        apply_review(db, s, user_id=who.user_id, username=who.username, action=body.action,
                     boxes=None if body.boxes is None else [b.to_box() for b in body.boxes], note=body.note)
    except ReviewError as e:
        db.rollback()
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(e)) from None
    db.commit()
    ctx.metrics.reviews.labels(body.action).inc()
    return s


@router.post("/{sample_id}/review", response_model=SampleDetail)
def review(sample_id: str, body: ReviewIn, db: Db, who: Annotated[Principal, Depends(require("reviewer"))],
           ctx: Annotated[HubContext, Depends(get_context)]) -> SampleDetail:
    s = review_sample(db, ctx, who, sample_id, body)
    return SampleDetail.full(s, history(db, s))
