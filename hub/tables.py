"""The hub's tables (SQLAlchemy 2 declarative). The schema itself is made by the Alembic
migrations in ``hub/migrations``; a change here needs a new revision there.

- ``stations``: one row per site/line/station ever seen (unique).
- ``samples``: one row per sample; ``sample_id`` (the contract's UUID) is unique and is the
  idempotency key: a redelivered sample never makes a second row.
- ``detections``: the model's boxes on a sample.
- ``dead_letters``: every message that could not be ingested, with the reason.
- ``agents``: the latest retained status and heartbeat of every agent (the fleet page).
- ``labels``: the reviewed boxes of a sample (what retraining learns from); replaced as a
  whole by each review.
- ``reviews``: the audit trail: every review action with who, when and the boxes after it.
- ``defect_classes``: class names known to the hub beyond the model's (added by reviewers).
- ``users``, ``api_tokens``, ``web_sessions``: accounts, script tokens and UI sessions. Only
  hashes of passwords (argon2) and of tokens (SHA-256) are stored.
- ``model_versions``: the model registry: every bundle version, its parent, the training data
  snapshot (sample ids), metrics, status (:data:`MODEL_STATUSES`) and who promoted it;
  ``model_events``: every status change (audit trail).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.sql.expression import true

__all__ = [
    "MODEL_STATUSES",
    "ROLES",
    "REVIEW_ACTIONS",
    "SAMPLE_STATUSES",
    "Agent",
    "ApiToken",
    "Base",
    "DeadLetter",
    "DefectClass",
    "Detection",
    "Label",
    "ModelEvent",
    "ModelVersion",
    "Review",
    "Sample",
    "Station",
    "User",
    "WebSession",
]

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
SAMPLE_STATUSES = ("new", "confirmed", "rejected")
REVIEW_ACTIONS = ("confirm", "reject", "reopen")
MODEL_STATUSES = ("candidate", "canary", "production", "retired", "rejected")
ROLES = ("viewer", "reviewer", "admin")  # each role can do what the ones before it can
BigId = BigInteger().with_variant(Integer(), "sqlite")  # SQLite only autoincrements INTEGER PRIMARY KEY


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Station(Base):
    __tablename__ = "stations"
    __table_args__ = (UniqueConstraint("site", "line", "station"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    site: Mapped[str] = mapped_column(String(64))
    line: Mapped[str] = mapped_column(String(64))
    station: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Sample(Base):
    __tablename__ = "samples"
    # The review queue's indexes: each in the queue's order (newest first: capture_ts, id), led by
    # the filter it serves (a station, a status, or none), and on PostgreSQL covering every other
    # sample filter (INCLUDE), so that the capped count of a filtered queue is an index-only scan.
    __table_args__ = (
        Index("ix_samples_station_id_capture_ts", "station_id", "capture_ts", "id",
              postgresql_include=["status", "max_score", "camera", "reason"]),
        Index("ix_samples_status_capture_ts", "status", "capture_ts", "id",
              postgresql_include=["station_id", "max_score", "camera", "reason"]),
        Index("ix_samples_capture_ts", "capture_ts", "id",
              postgresql_include=["station_id", "status", "max_score", "camera", "reason"]),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    sample_id: Mapped[str] = mapped_column(String(36), unique=True)
    station_id: Mapped[int] = mapped_column(ForeignKey("stations.id", ondelete="RESTRICT"))
    camera: Mapped[str] = mapped_column(String(64))
    capture_ts: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    model_version: Mapped[str] = mapped_column(String(64))
    reason: Mapped[str] = mapped_column(String(32))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    image_sha256: Mapped[str] = mapped_column(String(64))
    image_bytes: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default="new", server_default="new")
    max_score: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")  # of its detections
    reviewed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    reviewed_by: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"), nullable=True)

    station: Mapped[Station] = relationship()
    detections: Mapped[list[Detection]] = relationship(
        back_populates="sample", cascade="all, delete-orphan", order_by="Detection.id"
    )
    labels: Mapped[list[Label]] = relationship(
        back_populates="sample", cascade="all, delete-orphan", order_by="Label.id"
    )


class Detection(Base):
    __tablename__ = "detections"
    __table_args__ = (Index("ix_detections_cls_sample_pk", "cls", "sample_pk"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    sample_pk: Mapped[int] = mapped_column(ForeignKey("samples.id", ondelete="CASCADE"), index=True)
    cls: Mapped[str] = mapped_column(String(64))
    score: Mapped[float] = mapped_column(Float)
    x1: Mapped[float] = mapped_column(Float)
    y1: Mapped[float] = mapped_column(Float)
    x2: Mapped[float] = mapped_column(Float)
    y2: Mapped[float] = mapped_column(Float)

    sample: Mapped[Sample] = relationship(back_populates="detections")


class DeadLetter(Base):
    __tablename__ = "dead_letters"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    topic: Mapped[str] = mapped_column(Text)
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    reason: Mapped[str] = mapped_column(String(32), index=True)  # oversized | contract | topic | topic_mismatch
    detail: Mapped[str] = mapped_column(Text)
    payload_size: Mapped[int] = mapped_column(Integer)
    payload_excerpt: Mapped[str] = mapped_column(Text)
    payload_sha256: Mapped[str] = mapped_column(String(64))


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    role: Mapped[str] = mapped_column(String(16))  # one of ROLES
    active: Mapped[bool] = mapped_column(Boolean, default=True, server_default=true())
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ApiToken(Base):
    """A bearer token for scripts; acts as its user. Only the SHA-256 of the secret is kept."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)

    user: Mapped[User] = relationship()


class WebSession(Base):
    """A UI login. The cookie holds the secret; the row its SHA-256 and the session's CSRF token."""

    __tablename__ = "web_sessions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)

    user: Mapped[User] = relationship()


class Label(Base):
    """A reviewed box: the ground truth retraining learns from."""

    __tablename__ = "labels"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    sample_pk: Mapped[int] = mapped_column(ForeignKey("samples.id", ondelete="CASCADE"), index=True)
    cls: Mapped[str] = mapped_column(String(64))
    x1: Mapped[float] = mapped_column(Float)
    y1: Mapped[float] = mapped_column(Float)
    x2: Mapped[float] = mapped_column(Float)
    y2: Mapped[float] = mapped_column(Float)

    sample: Mapped[Sample] = relationship(back_populates="labels")


class Review(Base):
    """One review action (audit trail): never updated, never deleted with its user."""

    __tablename__ = "reviews"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    sample_pk: Mapped[int] = mapped_column(ForeignKey("samples.id", ondelete="CASCADE"), index=True)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"), nullable=True)
    username: Mapped[str] = mapped_column(String(64))  # kept even if the user is deleted
    action: Mapped[str] = mapped_column(String(16))  # one of REVIEW_ACTIONS
    status_before: Mapped[str] = mapped_column(String(16))
    status_after: Mapped[str] = mapped_column(String(16))
    boxes_json: Mapped[str] = mapped_column(Text)  # the labels after this review
    note: Mapped[str] = mapped_column(Text, default="", server_default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)


class DefectClass(Base):
    __tablename__ = "defect_classes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    created_by: Mapped[str] = mapped_column(String(64))


class Agent(Base):
    """The latest known state of one agent, from its retained status and its heartbeats."""

    __tablename__ = "agents"
    __table_args__ = (UniqueConstraint("station_id", "agent_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    station_id: Mapped[int] = mapped_column(ForeignKey("stations.id", ondelete="CASCADE"))
    agent_id: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), default="unknown", server_default="unknown")
    model_version: Mapped[str] = mapped_column(String(64), default="", server_default="")
    status_ts: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    heartbeat_ts: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    last_seen: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    fps: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    latency_p99_ms: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    dropped_frames: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    outbox_depth: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    uptime_s: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    mode: Mapped[str | None] = mapped_column(String(8), nullable=True)  # full | split | auto; None: not reported

    station: Mapped[Station] = relationship()


class ModelVersion(Base):
    """One bundle version in the registry."""

    __tablename__ = "model_versions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[str] = mapped_column(String(64), unique=True)
    parent_version: Mapped[str | None] = mapped_column(String(64), nullable=True)
    status: Mapped[str] = mapped_column(String(16), index=True)  # one of MODEL_STATUSES
    bundle_path: Mapped[str] = mapped_column(Text)
    manifest_sha256: Mapped[str] = mapped_column(String(64))
    data_snapshot_json: Mapped[str] = mapped_column(Text, default="[]", server_default="[]")  # sample ids
    metrics_json: Mapped[str] = mapped_column(Text, default="{}", server_default="{}")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    created_by: Mapped[str] = mapped_column(String(64))
    promoted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    promoted_by: Mapped[str | None] = mapped_column(String(64), nullable=True)


class ModelEvent(Base):
    """One status change of a model version (audit trail)."""

    __tablename__ = "model_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id", ondelete="CASCADE"), index=True)
    status_before: Mapped[str | None] = mapped_column(String(16), nullable=True)
    status_after: Mapped[str] = mapped_column(String(16))
    actor: Mapped[str] = mapped_column(String(64))
    reason: Mapped[str] = mapped_column(Text, default="", server_default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ModelAnnouncement(Base):
    """A version announced to one station (canary, production or rollback): whom a rollback must reach."""

    __tablename__ = "model_announcements"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id", ondelete="CASCADE"), index=True)
    site: Mapped[str] = mapped_column(String(64))
    line: Mapped[str] = mapped_column(String(64))
    station: Mapped[str] = mapped_column(String(64))
    stage: Mapped[str] = mapped_column(String(16))
    pinned: Mapped[bool] = mapped_column(Boolean)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
