"""The review queue and review actions: what QA staff do, independent of HTTP.

- :func:`list_samples` filters (site, line, station, camera, class, score range, status,
  reason, capture date) and pages the queue, newest first. The total is counted up to
  :data:`COUNT_CAP` (counting a million rows on every page view would cost more than the page),
  and only when the page is full: a partial page is the last one, so its total is already known.
- :func:`apply_review` stores a reviewer's decision: ``confirm`` (with the boxes as the reviewer
  left them: the model's, corrected, or drawn anew), ``reject`` (the frame has no defect: a
  reviewed negative that teaches away a false alarm) or ``reopen``. The sample's ``labels``
  are replaced as a whole and an audit row in ``reviews`` keeps who, when, and the boxes after.
- Box classes must be known: the model's classes seen at ingest or ones added with
  :func:`add_class` (a defect type that appeared after deployment).
"""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Select, exists, func, select
from sqlalchemy.orm import Session, aliased, selectinload

from hub.tables import REVIEW_ACTIONS, SAMPLE_STATUSES, DefectClass, Detection, Label, Review, Sample, Station
from lineguard_contract.topics import SEGMENT_PATTERN

__all__ = [
    "COUNT_CAP",
    "Box",
    "Page",
    "QueueFilter",
    "ReviewError",
    "add_class",
    "apply_review",
    "get_sample",
    "known_classes",
    "list_samples",
]

COUNT_CAP = 1_000  # "1000+ samples": a reviewer pages 50 at a time; see docs/benchmarks.md, review queue
MAX_PAGE_SIZE = 200
CLASS_CACHE_S = 30.0


class ReviewError(ValueError):
    """A review that cannot be applied; the message is for the reviewer."""


@dataclass(frozen=True)
class Box:
    cls: str
    x1: float
    y1: float
    x2: float
    y2: float

    def as_list(self) -> list[float]:
        return [self.x1, self.y1, self.x2, self.y2]


@dataclass
class QueueFilter:
    site: str | None = None
    line: str | None = None
    station: str | None = None
    camera: str | None = None
    cls: str | None = None
    status: str | None = None
    reason: str | None = None
    min_score: float | None = None
    max_score: float | None = None
    since: datetime | None = None
    until: datetime | None = None

    def __post_init__(self) -> None:
        if self.status is not None and self.status not in SAMPLE_STATUSES:
            raise ReviewError(f"status {self.status!r}: expected one of {', '.join(SAMPLE_STATUSES)}")

    def apply(self, q: Select) -> Select:
        if self.site or self.line or self.station:
            q = q.join(Station, Station.id == Sample.station_id)
            for col, value in ((Station.site, self.site), (Station.line, self.line), (Station.station, self.station)):
                if value:
                    q = q.where(col == value)
        if self.camera:
            q = q.where(Sample.camera == self.camera)
        if self.status:
            q = q.where(Sample.status == self.status)
        if self.reason:
            q = q.where(Sample.reason == self.reason)
        if self.min_score is not None:
            q = q.where(Sample.max_score >= self.min_score)
        if self.max_score is not None:
            q = q.where(Sample.max_score <= self.max_score)
        if self.since is not None:
            q = q.where(Sample.capture_ts >= self.since)
        if self.until is not None:
            q = q.where(Sample.capture_ts < self.until)
        if self.cls:
            q = q.where(exists().where(Detection.sample_pk == Sample.id, Detection.cls == self.cls))
        return q


@dataclass
class Page:
    items: list[Sample]
    page: int
    page_size: int
    total: int  # capped at COUNT_CAP
    total_capped: bool = False
    pages: int = field(init=False)

    def __post_init__(self) -> None:
        self.pages = max(1, -(-self.total // self.page_size))


def list_samples(s: Session, flt: QueueFilter, page: int = 1, page_size: int = 50) -> Page:
    if page < 1:
        raise ReviewError("page starts at 1")
    if not 1 <= page_size <= MAX_PAGE_SIZE:
        raise ReviewError(f"page_size must be 1-{MAX_PAGE_SIZE}")
    offset = (page - 1) * page_size
    q = (flt.apply(select(Sample)).options(selectinload(Sample.station), selectinload(Sample.detections))
         .order_by(Sample.capture_ts.desc(), Sample.id.desc())
         .offset(offset).limit(page_size))
    items = list(s.scalars(q))
    if 0 < len(items) < page_size or (page == 1 and not items):
        total = offset + len(items)  # the last page: the total is known without counting
    else:
        ids = flt.apply(select(Sample.id))
        total = int(s.scalar(select(func.count()).select_from(ids.limit(COUNT_CAP + 1).subquery())) or 0)
    return Page(items, page, page_size, min(total, COUNT_CAP), total > COUNT_CAP)


def get_sample(s: Session, sample_id: str) -> Sample | None:
    return s.scalar(select(Sample).where(Sample.sample_id == sample_id).options(
        selectinload(Sample.station), selectinload(Sample.detections), selectinload(Sample.labels)))


def history(s: Session, sample: Sample) -> list[Review]:
    return list(s.scalars(select(Review).where(Review.sample_pk == sample.id).order_by(Review.id)))


_class_cache: tuple[float, list[str]] | None = None
_class_lock = threading.Lock()


def _distinct_detection_classes() -> Select[Any]:
    """``SELECT DISTINCT cls FROM detections`` as a loose index scan for PostgreSQL: a recursive
    CTE that jumps from one class to the next on ``ix_detections_cls_sample_pk`` (one index probe
    per class, where DISTINCT reads every detection: 0.2 s at a million). Ends with a NULL."""
    d = aliased(Detection)
    cte = select(func.min(Detection.cls).label("cls")).cte("classes", recursive=True)
    nxt = select(func.min(d.cls)).where(d.cls > cte.c.cls).scalar_subquery()
    cte = cte.union_all(select(nxt).where(cte.c.cls.is_not(None)))
    return select(cte.c.cls)


def known_classes(s: Session, fresh: bool = False) -> list[str]:
    """Every class name: the model's (seen in detections) and the ones reviewers added."""
    global _class_cache
    with _class_lock:
        if not fresh and _class_cache is not None and time.monotonic() - _class_cache[0] < CLASS_CACHE_S:
            return list(_class_cache[1])
    names = set(s.scalars(select(DefectClass.name)))
    if s.get_bind().dialect.name == "postgresql":
        names.update(c for c in s.scalars(_distinct_detection_classes()) if c is not None)
    else:  # SQLite skips through the index for a DISTINCT on its first column by itself
        names.update(s.scalars(select(Detection.cls).distinct()))
    result = sorted(names)
    with _class_lock:
        _class_cache = (time.monotonic(), result)
    return list(result)


def add_class(s: Session, name: str, by: str) -> DefectClass:
    if not re.match(SEGMENT_PATTERN, name):
        raise ReviewError(f"class {name!r}: use 1-64 letters, digits, '_', '.', '-'")
    if s.scalar(select(DefectClass.id).where(DefectClass.name == name)) is not None:
        raise ReviewError(f"class {name!r} already exists")
    row = DefectClass(name=name, created_at=datetime.now(UTC), created_by=by)
    s.add(row)
    s.flush()
    known_classes(s, fresh=True)
    return row


def _check_boxes(sample: Sample, boxes: list[Box], classes: set[str]) -> None:
    for i, b in enumerate(boxes):
        if b.cls not in classes:
            raise ReviewError(f"box {i}: unknown class {b.cls!r}; add it first (known: {', '.join(sorted(classes))})")
        if not (0 <= b.x1 < b.x2 <= sample.width and 0 <= b.y1 < b.y2 <= sample.height):
            raise ReviewError(f"box {i}: {b.as_list()} is empty or outside the {sample.width}x{sample.height} frame")


def apply_review(s: Session, sample: Sample, *, user_id: int, username: str, action: str,
                 boxes: list[Box] | None = None, note: str = "") -> Review:
    """Apply one review action to ``sample`` (flushes; the caller commits)."""
    if action not in REVIEW_ACTIONS:
        raise ReviewError(f"action {action!r}: expected one of {', '.join(REVIEW_ACTIONS)}")
    if action == "confirm":
        if boxes is None:  # confirm as the model saw it
            boxes = [Box(d.cls, d.x1, d.y1, d.x2, d.y2) for d in sample.detections]
        if not boxes:
            raise ReviewError("confirm needs at least one box; reject a frame without defects")
        _check_boxes(sample, boxes, set(known_classes(s, fresh=True)))
        new_status = "confirmed"
    elif action == "reject":
        if boxes:
            raise ReviewError("reject means the frame has no defect; confirm it to keep boxes")
        boxes, new_status = [], "rejected"
    else:
        boxes, new_status = [], "new"
    now = datetime.now(UTC)
    before = sample.status
    sample.labels.clear()
    sample.labels.extend(Label(cls=b.cls, x1=b.x1, y1=b.y1, x2=b.x2, y2=b.y2) for b in boxes)
    sample.status = new_status
    sample.reviewed_at = None if action == "reopen" else now
    sample.reviewed_by = None if action == "reopen" else user_id
    review = Review(sample_pk=sample.id, user_id=user_id, username=username, action=action,
                    status_before=before, status_after=new_status, note=note[:2000], created_at=now,
                    boxes_json=json.dumps([{"cls": b.cls, "box": b.as_list()} for b in boxes]))
    s.add(review)
    s.flush()
    return review
