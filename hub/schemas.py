"""Request and response bodies of the REST API (``/api/v1``); the OpenAPI schema is built from these."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from hub.review import Box
from hub.tables import Review, Sample

__all__ = [
    "BoxIn",
    "BoxOut",
    "ClassIn",
    "DetectionOut",
    "ReviewIn",
    "ReviewOut",
    "SampleDetail",
    "SamplePage",
    "SampleSummary",
    "TokenIn",
    "TokenOut",
    "UserIn",
    "UserOut",
]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BoxIn(_In):
    cls: str = Field(min_length=1, max_length=64)
    box: list[float] = Field(min_length=4, max_length=4, description="[x1, y1, x2, y2] in frame pixels")

    def to_box(self) -> Box:
        return Box(self.cls, *self.box)


class ReviewIn(_In):
    action: Literal["confirm", "reject", "reopen"]
    boxes: list[BoxIn] | None = Field(None, description="confirm: the reviewed boxes; omit to keep the model's")
    note: str = Field("", max_length=2000)


class BoxOut(BaseModel):
    cls: str
    box: list[float]


class DetectionOut(BoxOut):
    score: float


class ReviewOut(BaseModel):
    username: str
    action: str
    status_before: str
    status_after: str
    boxes: list[BoxOut]
    note: str
    created_at: datetime

    @classmethod
    def of(cls, r: Review) -> ReviewOut:
        import json

        return cls(username=r.username, action=r.action, status_before=r.status_before, status_after=r.status_after,
                   boxes=[BoxOut(**b) for b in json.loads(r.boxes_json)], note=r.note, created_at=r.created_at)


class SampleSummary(BaseModel):
    sample_id: str
    site: str
    line: str
    station: str
    camera: str
    capture_ts: datetime
    received_at: datetime
    model_version: str
    reason: str
    status: str
    max_score: float
    width: int
    height: int
    detections: list[DetectionOut]

    @classmethod
    def of(cls, s: Sample) -> SampleSummary:
        return cls(sample_id=s.sample_id, site=s.station.site, line=s.station.line, station=s.station.station,
                   camera=s.camera, capture_ts=s.capture_ts, received_at=s.received_at,
                   model_version=s.model_version, reason=s.reason, status=s.status, max_score=s.max_score,
                   width=s.width, height=s.height,
                   detections=[DetectionOut(cls=d.cls, score=d.score, box=[d.x1, d.y1, d.x2, d.y2])
                               for d in s.detections])


class SampleDetail(SampleSummary):
    labels: list[BoxOut]
    reviewed_at: datetime | None
    history: list[ReviewOut]
    image_url: str

    @classmethod
    def full(cls, s: Sample, history: list[Review]) -> SampleDetail:
        base = SampleSummary.of(s).model_dump()
        return cls(**base, labels=[BoxOut(cls=lb.cls, box=[lb.x1, lb.y1, lb.x2, lb.y2]) for lb in s.labels],
                   reviewed_at=s.reviewed_at, history=[ReviewOut.of(r) for r in history],
                   image_url=f"/api/v1/samples/{s.sample_id}/image")


class SamplePage(BaseModel):
    items: list[SampleSummary]
    page: int
    page_size: int
    pages: int
    total: int
    total_capped: bool


class ClassIn(_In):
    name: str = Field(min_length=1, max_length=64)


class UserIn(_In):
    username: str
    password: str
    role: Literal["viewer", "reviewer", "admin"]


class UserOut(BaseModel):
    username: str
    role: str
    active: bool
    created_at: datetime


class TokenIn(_In):
    name: str = Field(min_length=1, max_length=64)
    username: str | None = Field(None, description="admins may create a token for another user")


class TokenOut(BaseModel):
    name: str
    username: str
    token: str = Field(description="shown once; the hub keeps only its hash")
