"""The durable sample outbox: selected samples wait here, on disk, until the broker has them.

One SQLite file in WAL mode. :meth:`SampleOutbox.put` is idempotent by ``sample_id`` and
returns only once the row is durable; the uplink reads the oldest rows with :meth:`peek`
and deletes them with :meth:`mark_delivered` when the broker has acknowledged them.

Durability: ``journal_mode=WAL`` with ``synchronous=FULL``. WAL with NORMAL already survives
a killed process (the commit is in the WAL file, in the OS cache), but a power cut may roll
back the last commits; FULL fsyncs the WAL on every commit, so a ``put`` that has returned
survives a power cut too. Samples are a few per second at most, so one fsync each is cheap.

Space: ``quota_bytes`` bounds the stored payload bytes. A put that would exceed it evicts the
oldest samples first (the newest are the ones QA still wants), logs a WARNING naming them
and adds them to a counter kept in the file. The file itself is larger than the payloads by
SQLite's page overhead; ``max_file_bytes`` caps it hard (SQLite ``max_page_count``). A full
disk or file makes ``put`` raise :class:`OutboxFullError`; the transaction is rolled back
and the file stays consistent.

One process owns an outbox file at a time (the cached figures are that process's); every
method is thread-safe.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

__all__ = ["SampleOutbox", "OutboxItem", "OutboxError", "OutboxFullError"]

log = logging.getLogger(__name__)

DEFAULT_QUOTA_BYTES = 512 * 1024 * 1024
_SCHEMA = """
CREATE TABLE IF NOT EXISTS samples (
    seq       INTEGER PRIMARY KEY AUTOINCREMENT,
    sample_id TEXT    NOT NULL UNIQUE,
    topic     TEXT    NOT NULL,
    payload   BLOB    NOT NULL,
    size      INTEGER NOT NULL,
    created   REAL    NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT OR IGNORE INTO counters (name, value) VALUES ('evicted', 0);
"""


class OutboxError(RuntimeError):
    """The outbox cannot do what was asked; the message names the file."""


class OutboxFullError(OutboxError):
    """The disk, or the file's ``max_file_bytes``, is full; nothing was written."""


@dataclass(frozen=True)
class OutboxItem:
    """One stored sample. ``seq`` orders items oldest first."""

    seq: int
    sample_id: str
    topic: str
    payload: bytes
    created: float


class SampleOutbox:
    """A durable FIFO of encoded sample payloads keyed by sample id."""

    def __init__(
        self,
        path: str | Path,
        quota_bytes: int = DEFAULT_QUOTA_BYTES,
        max_file_bytes: int | None = None,
    ) -> None:
        if quota_bytes <= 0:
            raise ValueError(f"quota_bytes must be positive, got {quota_bytes}")
        self.path = Path(path)
        self.quota_bytes = int(quota_bytes)
        self._lock = threading.RLock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
            mode = self._conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise OutboxError(f"outbox {self.path}: cannot use WAL mode (got {mode!r})")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA journal_size_limit=16777216")  # truncate the WAL back to 16 MiB
            if max_file_bytes is not None:
                page = int(self._conn.execute("PRAGMA page_size").fetchone()[0])
                self._conn.execute(f"PRAGMA max_page_count={max(int(max_file_bytes) // page, 1)}")
            self._conn.executescript(_SCHEMA)
            depth, size = self._conn.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM samples").fetchone()
            evicted = self._conn.execute("SELECT value FROM counters WHERE name = 'evicted'").fetchone()[0]
        except sqlite3.Error as exc:
            raise self._error("cannot open", exc) from exc
        self._depth, self._bytes, self._evicted = int(depth), int(size), int(evicted)
        log.info("outbox %s: %d samples, %d bytes waiting (quota %d bytes)", self.path, depth, size, quota_bytes)

    # -- figures -------------------------------------------------------------------------------

    @property
    def depth(self) -> int:
        """Samples waiting."""
        return self._depth

    @property
    def total_bytes(self) -> int:
        """Payload bytes waiting (what the quota bounds)."""
        return self._bytes

    @property
    def evicted(self) -> int:
        """Samples evicted to stay under the quota, over the life of this file."""
        return self._evicted

    # -- writes --------------------------------------------------------------------------------

    def put(self, sample_id: str, topic: str, payload: bytes) -> bool:
        """Store a sample durably. False (and nothing changes) when ``sample_id`` is already here.

        Evicts the oldest samples when the quota would be exceeded. Raises OutboxError for a
        payload larger than the whole quota, OutboxFullError when the disk or file is full.
        """
        size = len(payload)
        if size > self.quota_bytes:
            raise OutboxError(f"outbox {self.path}: sample {sample_id} of {size} bytes exceeds the whole "
                              f"quota of {self.quota_bytes} bytes")
        with self._lock:
            evicted: list[tuple[int, str, int]] = []
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                cur = self._conn.execute(
                    "INSERT OR IGNORE INTO samples (sample_id, topic, payload, size, created) VALUES (?, ?, ?, ?, ?)",
                    (sample_id, topic, bytes(payload), size, time.time()),
                )
                if cur.rowcount == 0:
                    self._conn.execute("ROLLBACK")
                    return False
                new_seq = cur.lastrowid
                excess = self._bytes + size - self.quota_bytes
                if excess > 0 and self._depth > 0:
                    rows = self._conn.execute(
                        "SELECT seq, sample_id, size FROM samples WHERE seq < ? ORDER BY seq", (new_seq,))
                    freed = 0
                    for seq, sid, sz in rows:
                        evicted.append((seq, sid, sz))
                        freed += sz
                        if freed >= excess:
                            break
                    rows.close()
                    self._conn.execute("DELETE FROM samples WHERE seq <= ?", (evicted[-1][0],))
                    self._conn.execute("UPDATE counters SET value = value + ? WHERE name = 'evicted'", (len(evicted),))
                self._conn.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                raise self._error(f"cannot store sample {sample_id}", exc) from exc
            freed_bytes = sum(sz for _, _, sz in evicted)
            self._depth += 1 - len(evicted)
            self._bytes += size - freed_bytes
            self._evicted += len(evicted)
        if evicted:
            ids = ", ".join(sid for _, sid, _ in evicted[:5]) + (", ..." if len(evicted) > 5 else "")
            log.warning("outbox %s over its quota of %d bytes: evicted the %d oldest samples (%d bytes: %s); "
                        "%d evicted in total", self.path, self.quota_bytes, len(evicted), freed_bytes, ids,
                        self._evicted)
        return True

    def mark_delivered(self, sample_ids: Iterable[str]) -> int:
        """Delete delivered samples; unknown ids are ignored. Returns how many were deleted."""
        ids = list(dict.fromkeys(sample_ids))
        if not ids:
            return 0
        with self._lock:
            removed, freed = 0, 0
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                for i in range(0, len(ids), 500):
                    chunk = ids[i : i + 500]
                    marks = ",".join("?" * len(chunk))
                    n, sz = self._conn.execute(
                        f"SELECT COUNT(*), COALESCE(SUM(size), 0) FROM samples WHERE sample_id IN ({marks})", chunk
                    ).fetchone()
                    self._conn.execute(f"DELETE FROM samples WHERE sample_id IN ({marks})", chunk)
                    removed, freed = removed + int(n), freed + int(sz)
                self._conn.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                raise self._error("cannot delete delivered samples", exc) from exc
            self._depth -= removed
            self._bytes -= freed
            return removed

    # -- reads ---------------------------------------------------------------------------------

    def peek(self, limit: int = 16, after_seq: int = 0) -> list[OutboxItem]:
        """Up to ``limit`` samples with ``seq > after_seq``, oldest first. Nothing is removed."""
        with self._lock:
            try:
                rows = self._conn.execute(
                    "SELECT seq, sample_id, topic, payload, created FROM samples WHERE seq > ? ORDER BY seq LIMIT ?",
                    (after_seq, limit),
                ).fetchall()
            except sqlite3.Error as exc:
                raise self._error("cannot read", exc) from exc
        return [OutboxItem(int(s), str(i), str(t), bytes(p), float(c)) for s, i, t, p, c in rows]

    def __contains__(self, sample_id: object) -> bool:
        with self._lock:
            row = self._conn.execute("SELECT 1 FROM samples WHERE sample_id = ?", (sample_id,)).fetchone()
        return row is not None

    # -- lifecycle -----------------------------------------------------------------------------

    def close(self) -> None:
        """Checkpoint the WAL into the database file and close it."""
        with self._lock:
            try:
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as exc:  # still close; the WAL is replayed on the next open
                log.warning("outbox %s: checkpoint on close failed: %s", self.path, exc)
            self._conn.close()

    def __enter__(self) -> SampleOutbox:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def _rollback(self) -> None:
        if self._conn.in_transaction:
            try:
                self._conn.execute("ROLLBACK")
            except sqlite3.Error as exc:  # SQLite may have rolled back already
                log.debug("outbox %s: rollback: %s", self.path, exc)

    def _error(self, what: str, exc: sqlite3.Error) -> OutboxError:
        if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "full" in str(exc).lower():
            return OutboxFullError(f"outbox {self.path}: {what}: the disk or the file's size cap is full ({exc}); "
                                   "nothing was written")
        return OutboxError(f"outbox {self.path}: {what}: {exc}")
