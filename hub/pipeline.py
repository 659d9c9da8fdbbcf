"""What the hub does with one received message, independent of MQTT (so it can be driven
directly, e.g. by fuzz tests): :meth:`IngestPipeline.handle` ``(topic, payload)``.

- A topic that does not parse as a contract station topic, a payload over
  ``max_payload_bytes``, a payload the contract refuses (:class:`ContractError`) and a sample
  whose site/line/station differ from its topic's go to ``dead_letters`` with the reason;
  never an exception.
- A valid sample: the image goes to the blob store first (content-addressed, idempotent), then
  the sample and its detections are inserted in one transaction. ``sample_id`` is unique: the
  insert is ``INSERT ... ON CONFLICT (sample_id) DO NOTHING RETURNING id`` (SQLite and
  PostgreSQL), so a redelivered sample, even one racing in another worker, is a no-op counted
  as a duplicate.
- Status and heartbeat messages are validated and their latest value kept per station.

Database errors (the database down, a disk full) do raise: the caller must then not
acknowledge the message, so that the broker delivers it again.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Table, insert, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from hub.blobs import BlobStore
from hub.tables import DeadLetter, Detection, Sample, Station
from lineguard_contract import (
    MAX_PAYLOAD_BYTES,
    ContractError,
    HeartbeatPayload,
    SamplePayload,
    StationId,
    StatusPayload,
    Topics,
    decode,
)

__all__ = ["IngestPipeline", "Outcome", "EXCERPT_BYTES"]

log = logging.getLogger(__name__)
EXCERPT_BYTES = 512
KINDS = ("samples", "status", "heartbeat")  # what the hub ingests; "results" is for live views


class Outcome(enum.Enum):
    STORED = "stored"
    DUPLICATE = "duplicate"
    DEAD_LETTER = "dead_letter"
    STATUS = "status"
    HEARTBEAT = "heartbeat"


def _now() -> datetime:
    return datetime.now(UTC)


def _excerpt(payload: bytes) -> str:
    text = payload[:EXCERPT_BYTES].decode("utf-8", "backslashreplace")
    return text.replace("\x00", "\\x00")  # PostgreSQL text cannot hold NUL


class IngestPipeline:
    def __init__(self, sessions: sessionmaker[Session], blobs: BlobStore, *,
                 max_payload_bytes: int = MAX_PAYLOAD_BYTES, topics: Topics | None = None,
                 clock: Callable[[], datetime] = _now, db_retries: int = 3) -> None:
        self.sessions = sessions
        self.blobs = blobs
        self.max_payload_bytes = max_payload_bytes
        self.topics = topics or Topics()
        self.clock = clock
        self.db_retries = db_retries
        self._lock = threading.Lock()
        self._counts = {o.value: 0 for o in Outcome}
        self._station_ids: dict[StationId, int] = {}
        self.last_status: dict[StationId, StatusPayload] = {}
        self.last_heartbeat: dict[StationId, HeartbeatPayload] = {}

    # -- counters ------------------------------------------------------------------------------
    def counters(self) -> dict[str, int]:
        """``stored``, ``duplicate``, ``dead_letter``, ``status``, ``heartbeat`` since start."""
        with self._lock:
            return dict(self._counts)

    def _count(self, outcome: Outcome) -> Outcome:
        with self._lock:
            self._counts[outcome.value] += 1
        return outcome

    # -- entry point ---------------------------------------------------------------------------
    def handle(self, topic: str, payload: bytes) -> Outcome:
        """Ingest one message; raises only on database (or blob store) failure."""
        received = self.clock()
        try:
            sid, kind = self.topics.parse(topic)
        except ValueError as e:
            return self.dead_letter(topic, payload, "topic", str(e), received)
        if kind not in KINDS:
            return self.dead_letter(topic, payload, "topic", f"the hub does not ingest {kind!r} messages", received)
        if len(payload) > self.max_payload_bytes:
            return self.dead_letter(topic, payload, "oversized",
                                    f"{len(payload)} bytes, over the {self.max_payload_bytes} limit", received)
        try:
            msg = decode(kind, payload)
        except ContractError as e:
            return self.dead_letter(topic, payload, "contract", str(e), received)
        if isinstance(msg, SamplePayload):
            if msg.station_id != sid:
                return self.dead_letter(topic, payload, "topic_mismatch",
                                        f"payload is from {msg.site}/{msg.line}/{msg.station}, "
                                        f"topic from {sid.site}/{sid.line}/{sid.station}", received)
            return self._count(self._retrying(lambda: self._store_sample(msg, received)))
        if isinstance(msg, StatusPayload):
            with self._lock:
                self.last_status[sid] = msg
            return self._count(Outcome.STATUS)
        assert isinstance(msg, HeartbeatPayload)
        with self._lock:
            self.last_heartbeat[sid] = msg
        return self._count(Outcome.HEARTBEAT)

    def dead_letter(self, topic: str, payload: bytes, reason: str, detail: str,
                    received: datetime | None = None) -> Outcome:
        log.warning("dead letter (%s) on %r: %s", reason, topic, detail)
        row = {
            "topic": topic, "received_at": received or self.clock(), "reason": reason, "detail": detail,
            "payload_size": len(payload), "payload_excerpt": _excerpt(payload),
            "payload_sha256": hashlib.sha256(payload).hexdigest(),
        }

        def write() -> Outcome:
            with self.sessions.begin() as s:
                s.execute(insert(DeadLetter), [row])
            return Outcome.DEAD_LETTER

        return self._count(self._retrying(write))

    # -- storage -------------------------------------------------------------------------------
    def _retrying(self, fn: Callable[[], Outcome]) -> Outcome:
        delay = 0.05
        for attempt in range(self.db_retries):
            try:
                return fn()
            except OperationalError:  # locked, connection lost: worth another try
                if attempt == self.db_retries - 1:
                    raise
                log.warning("database error, retrying in %.2f s", delay, exc_info=True)
                time.sleep(delay)
                delay *= 4
        raise AssertionError("unreachable")

    def _store_sample(self, p: SamplePayload, received: datetime) -> Outcome:
        sha = self.blobs.put(p.image)  # before the row: a stored row always has its blob
        outcome = Outcome.STORED
        with self.sessions.begin() as s:
            station_pk = self._station_pk(s, p.station_id, received)
            sample_pk = _insert_ignore(s, Sample.__table__, {  # type: ignore[arg-type]
                "sample_id": p.sample_id, "station_id": station_pk, "camera": p.camera,
                "capture_ts": datetime.fromtimestamp(p.capture_ts, UTC), "received_at": received,
                "model_version": p.model_version, "reason": p.reason, "width": p.width, "height": p.height,
                "image_sha256": sha, "image_bytes": len(p.image), "status": "new",
            }, ("sample_id",), Sample.id)
            if sample_pk is None:
                outcome = Outcome.DUPLICATE
            elif p.detections:
                s.execute(insert(Detection), [
                    {"sample_pk": sample_pk, "cls": d.cls, "score": d.score,
                     "x1": d.box[0], "y1": d.box[1], "x2": d.box[2], "y2": d.box[3]}
                    for d in p.detections
                ])
        self._station_ids[p.station_id] = station_pk  # only once committed
        return outcome

    def _station_pk(self, s: Session, sid: StationId, now: datetime) -> int:
        cached = self._station_ids.get(sid)
        if cached is not None:
            return cached
        _insert_ignore(s, Station.__table__, {  # type: ignore[arg-type]
            "site": sid.site, "line": sid.line, "station": sid.station, "created_at": now,
        }, ("site", "line", "station"), Station.id)
        return int(s.execute(select(Station.id).where(
            Station.site == sid.site, Station.line == sid.line, Station.station == sid.station)).scalar_one())


def _insert_ignore(s: Session, table: Table, values: dict[str, Any], conflict: tuple[str, ...],
                   returning: Any) -> int | None:
    """Insert ``values`` unless a row with the same ``conflict`` columns exists; the new row's id,
    or None when it existed. Atomic under concurrency on SQLite and PostgreSQL (``ON CONFLICT DO
    NOTHING``: a racing insert of the same key waits for the other transaction, then does nothing)."""
    dialect = s.get_bind().dialect.name
    if dialect in ("sqlite", "postgresql"):
        mod: Any = sqlite if dialect == "sqlite" else postgresql
        stmt = mod.insert(table).values(**values).on_conflict_do_nothing(index_elements=list(conflict))
        row = s.execute(stmt.returning(returning)).first()
        return None if row is None else int(row[0])
    try:  # other databases: a savepoint around a plain insert
        with s.begin_nested():
            return int(s.execute(insert(table).values(**values).returning(returning)).scalar_one())
    except IntegrityError:
        return None
