"""What the hub does with received messages, independent of MQTT (so it can be driven directly,
e.g. by fuzz tests): :meth:`IngestPipeline.handle_batch` ``([(topic, payload), ...])`` ingests a
batch in **one transaction** and returns one :class:`Outcome` per message, in order;
:meth:`IngestPipeline.handle` ``(topic, payload)`` is a batch of one.

- A topic that does not parse as a contract station topic, a payload over
  ``max_payload_bytes``, a payload the contract refuses (:class:`ContractError`), a sample whose
  site/line/station differ from its topic's, and a message the database cannot hold (a NUL
  character, a counter beyond its column) go to ``dead_letters`` with the reason; never an
  exception. The others of the batch are stored all the same.
- A valid sample: the images of the batch go to the blob store first (durable on return; a few
  threads at once), then the samples and their detections are inserted. ``sample_id`` is unique
  (``INSERT ... ON CONFLICT (sample_id) DO NOTHING``), so a redelivered sample, the same sample
  twice in one batch, or one racing in another worker is stored once; the others are duplicates.
- Status and heartbeat messages are upserted into ``agents`` (see
  :func:`hub.agent_state.fold_agent_message` for which message wins).

Database errors (the database down, a disk full) raise :class:`IngestError` after
``db_retries`` attempts, with the outcomes of the messages committed before it (none, unless the
batch was being retried message by message): the caller must not acknowledge the others, so that
the broker delivers them again. A batch the database refuses as data (``DataError``) is retried
one message at a time, and the message it refuses alone becomes a dead letter. SQLite and
PostgreSQL only (upserts are ``ON CONFLICT``).
"""

from __future__ import annotations

import enum
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Table, insert, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DataError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from hub.agent_state import fold_agent_message
from hub.blobs import BlobStore
from hub.tables import Agent, DeadLetter, Detection, Sample, Station
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

__all__ = ["IngestError", "IngestPipeline", "Outcome", "EXCERPT_BYTES"]

log = logging.getLogger(__name__)
EXCERPT_BYTES = 512
KINDS = ("samples", "status", "heartbeat")  # what the hub ingests; "results" is for live views
INT32_MAX, INT64_MAX = 2**31 - 1, 2**63 - 1
Parsed = SamplePayload | StatusPayload | HeartbeatPayload
_TABLES: list[Table] = [m.__table__ for m in (Agent, DeadLetter, Detection, Sample, Station)]  # type: ignore[misc]
AGENTS, DEAD_LETTERS, DETECTIONS, SAMPLES, STATIONS = _TABLES


class Outcome(enum.Enum):
    STORED = "stored"
    DUPLICATE = "duplicate"
    DEAD_LETTER = "dead_letter"
    STATUS = "status"
    HEARTBEAT = "heartbeat"


class IngestError(Exception):
    """The database (or blob store) failed. ``outcomes``: those of the first messages of the
    batch, committed before the failure (acknowledge these, and only these)."""

    def __init__(self, outcomes: list[Outcome]) -> None:
        super().__init__(f"ingest failed after {len(outcomes)} committed message(s)")
        self.outcomes = outcomes


@dataclass(slots=True)
class _Item:
    """One message once parsed: ``msg`` when valid, ``dead`` = (reason, detail) otherwise."""

    topic: str
    payload: bytes
    msg: Parsed | None = None
    sid: StationId | None = None
    dead: tuple[str, str] | None = None
    sha: str = ""


def _now() -> datetime:
    return datetime.now(UTC)


def _ts(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def _excerpt(payload: bytes) -> str:
    text = payload[:EXCERPT_BYTES].decode("utf-8", "backslashreplace")
    return text.replace("\x00", "\\x00")  # PostgreSQL text cannot hold NUL


def _unstorable(msg: Parsed) -> str | None:
    """Why the database cannot hold ``msg`` although the contract accepts it, or None."""
    texts = [msg.model_version] + ([d.cls for d in msg.detections] if isinstance(msg, SamplePayload) else [])
    if any("\x00" in t for t in texts):
        return "a NUL character in model_version or a detection class (PostgreSQL text cannot hold it)"
    if isinstance(msg, HeartbeatPayload) and (msg.dropped_frames > INT64_MAX or msg.outbox_depth > INT32_MAX):
        return "dropped_frames or outbox_depth beyond what its column holds"
    return None


class IngestPipeline:
    def __init__(self, sessions: sessionmaker[Session], blobs: BlobStore, *,
                 max_payload_bytes: int = MAX_PAYLOAD_BYTES, topics: Topics | None = None,
                 clock: Callable[[], datetime] = _now, db_retries: int = 3, blob_threads: int = 4) -> None:
        self.sessions = sessions
        self.blobs = blobs
        self.max_payload_bytes = max_payload_bytes
        self.topics = topics or Topics()
        self.clock = clock
        self.db_retries = db_retries
        self.blob_threads = blob_threads
        self._lock = threading.Lock()
        self._counts = {o.value: 0 for o in Outcome}
        self._station_ids: dict[StationId, int] = {}
        self._pool: ThreadPoolExecutor | None = None

    def close(self) -> None:
        """Stop the blob-writing threads (started on the first batch with more than one image)."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    # -- counters ------------------------------------------------------------------------------
    def counters(self) -> dict[str, int]:
        """``stored``, ``duplicate``, ``dead_letter``, ``status``, ``heartbeat`` since start."""
        with self._lock:
            return dict(self._counts)

    def _count(self, outcomes: list[Outcome]) -> list[Outcome]:
        with self._lock:
            for o in outcomes:
                self._counts[o.value] += 1
        return outcomes

    # -- entry points --------------------------------------------------------------------------
    def handle(self, topic: str, payload: bytes) -> Outcome:
        """Ingest one message; raises :class:`IngestError` only on database (or blob store) failure."""
        return self.handle_batch([(topic, payload)])[0]

    def handle_batch(self, messages: Sequence[tuple[str, bytes]]) -> list[Outcome]:
        """Ingest ``messages`` in one transaction; their outcomes, in order, once committed."""
        if not messages:
            return []
        received = self.clock()
        items = [self._parse(topic, payload) for topic, payload in messages]
        try:
            self._put_blobs(items)
            outcomes = self._retrying(lambda: self._commit(items, received))
        except DataError:
            log.warning("the database refused a batch of %d as data; storing it message by message", len(items))
        except Exception as e:
            raise IngestError([]) from e
        else:
            return self._count(outcomes)
        done: list[Outcome] = []
        for item in items:  # one transaction each: the message the database refuses becomes a dead letter
            try:
                try:
                    outcome = self._retrying(lambda: self._commit([item], received))[0]  # noqa: B023
                except DataError as e:
                    refused = self._dead(_Item(item.topic, item.payload), "rejected", str(e.orig or e).splitlines()[0])
                    outcome = self._retrying(lambda: self._commit([refused], received))[0]  # noqa: B023
            except Exception as e:
                raise IngestError(done) from e
            done.append(self._count([outcome])[0])
        return done

    # -- parsing (no database) -----------------------------------------------------------------
    def _parse(self, topic: str, payload: bytes) -> _Item:
        item = _Item(topic, payload)
        try:
            sid, kind = self.topics.parse(topic)
        except ValueError as e:
            return self._dead(item, "topic", str(e))
        if kind not in KINDS:
            return self._dead(item, "topic", f"the hub does not ingest {kind!r} messages")
        if len(payload) > self.max_payload_bytes:
            return self._dead(item, "oversized", f"{len(payload)} bytes, over the {self.max_payload_bytes} limit")
        try:
            msg = decode(kind, payload)
        except ContractError as e:
            return self._dead(item, "contract", str(e))
        if isinstance(msg, SamplePayload) and msg.station_id != sid:
            return self._dead(item, "topic_mismatch", f"payload is from {msg.site}/{msg.line}/{msg.station}, "
                                                      f"topic from {sid.site}/{sid.line}/{sid.station}")
        assert isinstance(msg, Parsed), "KINDS holds no other kind"
        why = _unstorable(msg)
        if why is not None:
            return self._dead(item, "unstorable", why)
        item.msg, item.sid = msg, sid
        return item

    @staticmethod
    def _dead(item: _Item, reason: str, detail: str) -> _Item:
        log.warning("dead letter (%s) on %r: %s", reason, item.topic, detail)
        item.dead = (reason, detail)
        return item

    def _put_blobs(self, items: list[_Item]) -> None:
        """Every image of the batch durable in the blob store before any row refers to it."""
        samples = [it for it in items if isinstance(it.msg, SamplePayload)]
        images = [it.msg.image for it in samples]  # type: ignore[union-attr]
        if len(images) > 1 and self.blob_threads > 1:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.blob_threads, thread_name_prefix="blobs")
            keys = list(self._pool.map(self.blobs.put, images))  # the same image twice: the second is a no-op
        else:
            keys = [self.blobs.put(data) for data in images]
        for it, key in zip(samples, keys, strict=True):
            it.sha = key

    # -- storage -------------------------------------------------------------------------------
    def _retrying(self, fn: Callable[[], list[Outcome]]) -> list[Outcome]:
        delay = 0.05
        for attempt in range(self.db_retries):
            try:
                return fn()
            except OperationalError:  # locked, connection lost, deadlock: worth another try
                if attempt == self.db_retries - 1:
                    raise
                log.warning("database error, retrying in %.2f s", delay, exc_info=True)
                time.sleep(delay)
                delay *= 4
        raise AssertionError("unreachable")

    def _commit(self, items: list[_Item], received: datetime) -> list[Outcome]:
        """One transaction for ``items``: stations, samples, detections, dead letters, agents."""
        outcomes: list[Outcome | None] = [None] * len(items)
        new_stations: dict[StationId, int] = {}
        with self.sessions.begin() as s:
            pk = {sid: self._station_pk(s, sid, received, new_stations)
                  for sid in sorted({it.sid for it in items if it.sid is not None}, key=_station_key)}
            first: dict[str, int] = {}  # sample_id -> index of its first occurrence in the batch
            for i, it in enumerate(items):
                if isinstance(it.msg, SamplePayload):
                    if it.msg.sample_id in first:
                        outcomes[i] = Outcome.DUPLICATE
                    else:
                        first[it.msg.sample_id] = i
            order = sorted(first)  # one lock order for every worker: no deadlock between batches
            inserted = self._insert_samples(s, [_sample_row(items[first[k]], pk, received) for k in order])
            detections = []
            for sample_id, i in first.items():
                sample_pk = inserted.get(sample_id)
                outcomes[i] = Outcome.DUPLICATE if sample_pk is None else Outcome.STORED
                if sample_pk is not None:
                    detections += [{"sample_pk": sample_pk, "cls": d.cls, "score": d.score, "x1": d.box[0],
                                    "y1": d.box[1], "x2": d.box[2], "y2": d.box[3]}
                                   for d in items[i].msg.detections]  # type: ignore[union-attr]
            if detections and s.get_bind().dialect.name == "postgresql":
                _insert_unnest(s, DETECTIONS, detections)
            elif detections:
                s.execute(insert(DETECTIONS), detections)
            if dead := [i for i, it in enumerate(items) if it.dead is not None]:
                s.execute(insert(DEAD_LETTERS), [_dead_row(items[i], received) for i in dead])
                outcomes = [Outcome.DEAD_LETTER if i in dead else o for i, o in enumerate(outcomes)]
            fleet = [i for i, it in enumerate(items) if isinstance(it.msg, StatusPayload | HeartbeatPayload)]
            for i in sorted(fleet, key=lambda i: (_station_key(items[i].sid), items[i].msg.agent_id, i)):  # type: ignore
                msg = items[i].msg
                assert isinstance(msg, StatusPayload | HeartbeatPayload)
                fold_agent_message(s, pk[items[i].sid], msg)  # type: ignore[index]
                outcomes[i] = Outcome.STATUS if isinstance(msg, StatusPayload) else Outcome.HEARTBEAT
        self._station_ids.update(new_stations)  # only once committed
        assert all(o is not None for o in outcomes)
        return outcomes  # type: ignore[return-value]

    def _insert_samples(self, s: Session, rows: list[dict[str, Any]]) -> dict[str, int]:
        """Insert ``rows`` unless their sample_id exists; ``{sample_id: id}`` of those inserted."""
        if not rows:
            return {}
        if s.get_bind().dialect.name == "postgresql":
            conflict = "ON CONFLICT (sample_id) DO NOTHING RETURNING sample_id, id"
            return {sid: int(pk) for sid, pk in _insert_unnest(s, SAMPLES, rows, conflict)}
        stmt = sqlite.insert(SAMPLES).on_conflict_do_nothing(index_elements=["sample_id"])
        return {sid: int(pk) for sid, pk in s.execute(stmt.returning(Sample.sample_id, Sample.id), rows)}

    def _station_pk(self, s: Session, sid: StationId, now: datetime, new: dict[StationId, int]) -> int:
        if (cached := self._station_ids.get(sid)) is not None:
            return cached
        key = {"site": sid.site, "line": sid.line, "station": sid.station}
        _insert_ignore(s, STATIONS, {**key, "created_at": now}, tuple(key), Station.id)
        new[sid] = int(s.execute(select(Station.id).filter_by(**key)).scalar_one())
        return new[sid]


def _insert_unnest(s: Session, table: Table, rows: list[dict[str, Any]], suffix: str = "") -> list[Any]:
    """PostgreSQL: ``INSERT INTO table (cols) SELECT * FROM unnest(<one array per column>) suffix``.
    One short statement whatever the number of rows, so psycopg caches and prepares it (a
    multi-row VALUES statement is parsed anew by psycopg for every batch: a third of the time)."""
    dialect = s.get_bind().dialect
    cols = list(rows[0])
    arrays = ", ".join(f"%s::{table.c[c].type.compile(dialect=dialect)}[]" for c in cols)
    sql = f"INSERT INTO {table.name} ({', '.join(cols)}) SELECT * FROM unnest({arrays}) {suffix}"
    result = s.connection().exec_driver_sql(sql, tuple([r[c] for r in rows] for c in cols))
    return list(result) if suffix else []


def _station_key(sid: StationId | None) -> tuple[str, str, str]:
    assert sid is not None
    return (sid.site, sid.line, sid.station)


def _sample_row(it: _Item, station_pk: dict[StationId, int], received: datetime) -> dict[str, Any]:
    p = it.msg
    assert isinstance(p, SamplePayload) and it.sid is not None
    return {"sample_id": p.sample_id, "station_id": station_pk[it.sid], "camera": p.camera,
            "capture_ts": _ts(p.capture_ts), "received_at": received, "model_version": p.model_version,
            "reason": p.reason, "width": p.width, "height": p.height, "image_sha256": it.sha,
            "image_bytes": len(p.image), "status": "new",
            "max_score": max((d.score for d in p.detections), default=0.0)}


def _dead_row(it: _Item, received: datetime) -> dict[str, Any]:
    assert it.dead is not None
    return {"topic": it.topic.replace("\x00", "\\x00"), "received_at": received, "reason": it.dead[0],
            "detail": it.dead[1].replace("\x00", "\\x00"), "payload_size": len(it.payload),
            "payload_excerpt": _excerpt(it.payload), "payload_sha256": hashlib.sha256(it.payload).hexdigest()}


def _insert_ignore(s: Session, table: Table, values: dict[str, Any], conflict: tuple[str, ...],
                   returning: Any) -> int | None:
    """Insert ``values`` unless a row with the same ``conflict`` columns exists; the new row's id,
    or None when it existed. Atomic under concurrency on SQLite and PostgreSQL (``ON CONFLICT DO
    NOTHING``: a racing insert of the same key waits for the other transaction, then does nothing)."""
    mod: Any = sqlite if s.get_bind().dialect.name == "sqlite" else postgresql
    stmt = mod.insert(table).values(**values).on_conflict_do_nothing(index_elements=list(conflict))
    row = s.execute(stmt.returning(returning)).first()
    return None if row is None else int(row[0])
