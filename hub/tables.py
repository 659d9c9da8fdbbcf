"""The hub's tables (SQLAlchemy 2 declarative). The schema itself is made by the Alembic
migrations in ``hub/migrations``; a change here needs a new revision there.

- ``stations``: one row per site/line/station ever seen (unique).
- ``samples``: one row per sample; ``sample_id`` (the contract's UUID) is unique and is the
  idempotency key: a redelivered sample never makes a second row.
- ``detections``: the model's boxes on a sample.
- ``dead_letters``: every message that could not be ingested, with the reason.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
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

__all__ = ["Base", "DeadLetter", "Detection", "Sample", "Station", "SAMPLE_STATUSES"]

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
SAMPLE_STATUSES = ("new", "confirmed", "rejected")
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
    __table_args__ = (
        Index("ix_samples_station_id_capture_ts", "station_id", "capture_ts"),
        Index("ix_samples_status_capture_ts", "status", "capture_ts"),
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

    station: Mapped[Station] = relationship()
    detections: Mapped[list[Detection]] = relationship(
        back_populates="sample", cascade="all, delete-orphan", order_by="Detection.id"
    )


class Detection(Base):
    __tablename__ = "detections"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    sample_pk: Mapped[int] = mapped_column(ForeignKey("samples.id", ondelete="CASCADE"), index=True)
    cls: Mapped[str] = mapped_column(String(64), index=True)
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
