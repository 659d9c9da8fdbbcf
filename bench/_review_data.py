"""The review-queue benchmark's data (bench/review_queue.py): ``--samples`` samples with
realistic distributions (2 sites x 5 lines x 4 stations, 2-4 cameras each, capture times over 90
days, reasons defect/uncertain/random_negative 60/25/15%, 0-3 detections over 4 classes plus a rare
one, 80% new and 20% reviewed), bulk-loaded with COPY on PostgreSQL (secondary indexes built after
the load, then VACUUM ANALYZE) or executemany on SQLite; and the index sync for a reused schema.
"""

from __future__ import annotations

import os
import random
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, text
from tqdm import tqdm

from hub.tables import Base

__all__ = ["CLASSES", "RARE_CLASS", "generate", "load", "loadavg", "log", "sync_indexes"]

SITES = ("plant1", "plant2")
LINES = ("lineA", "lineB", "lineC", "lineD", "lineE")
STATIONS = ("st01", "st02", "st03", "st04")
CLASSES = ("scratch", "dent", "crack", "stain")
CLASS_WEIGHTS = (0.45, 0.30, 0.15, 0.10)
RARE_CLASS, RARE_SHARE = "burr", 0.0005  # of detections
DAYS = 90
CHUNK = 50_000


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def log(msg: str) -> None:
    print(f"[{datetime.now():%H:%M:%S}] load {' '.join(f'{x:.2f}' for x in loadavg())}  {msg}", flush=True)


# -- data ----------------------------------------------------------------------------------------
def station_rows(now: datetime) -> list[tuple[Any, ...]]:
    rows, i = [], 0
    for site in SITES:
        for line in LINES:
            for st in STATIONS:
                i += 1
                rows.append((i, site, line, st, now - timedelta(days=DAYS + 1)))
    return rows


def generate(n: int, seed: int, end: datetime) -> Iterator[tuple[tuple[Any, ...], list[tuple[Any, ...]]]]:
    """``(sample row, detection rows)`` for samples 1..n, in capture order (ids follow capture time
    within a couple of minutes, as an append-only table filled by live agents)."""
    rng = random.Random(seed)
    n_st = len(SITES) * len(LINES) * len(STATIONS)
    st_weights = [rng.uniform(0.5, 1.5) for _ in range(n_st)]
    st_cum = [sum(st_weights[:i + 1]) for i in range(n_st)]
    cameras = {i + 1: 2 + i % 3 for i in range(n_st)}
    cls_cum = [sum(CLASS_WEIGHTS[:i + 1]) for i in range(len(CLASSES))]
    start = end - timedelta(days=DAYS)
    span = DAYS * 86400.0
    det_id = 0
    for i in range(1, n + 1):
        r = rng.random()
        st = 1 + next(k for k, c in enumerate(st_cum) if r * st_cum[-1] <= c)
        ts = start + timedelta(seconds=span * i / n - rng.uniform(0, 120))
        r = rng.random()
        if r < 0.60:
            reason, lo, hi = "defect", 0.5, 0.99
            k = 1 if (r2 := rng.random()) < 0.55 else 2 if r2 < 0.85 else 3
        elif r < 0.85:
            reason, lo, hi = "uncertain", 0.25, 0.5
            k = 1 if rng.random() < 0.7 else 2
        else:
            reason, lo, hi = "random_negative", 0.05, 0.25
            k = 0 if rng.random() < 0.9 else 1
        dets = []
        max_score = 0.0
        for j in range(k):
            score = rng.uniform(lo, hi) if j == 0 else max_score * rng.uniform(0.5, 1.0)
            max_score = max(max_score, score)
            if rng.random() < RARE_SHARE:
                cls = RARE_CLASS
            else:
                rc = rng.random()
                cls = CLASSES[next(c for c, w in enumerate(cls_cum) if rc <= w)]
            x1, y1 = rng.uniform(0, 560), rng.uniform(0, 400)
            det_id += 1
            dets.append((det_id, i, cls, round(score, 4), round(x1, 1), round(y1, 1),
                         round(x1 + rng.uniform(8, 80), 1), round(y1 + rng.uniform(8, 80), 1)))
        r = rng.random()
        status = "new" if r < 0.8 else "confirmed" if r < 0.92 else "rejected"
        reviewed_at = None if status == "new" else ts + timedelta(hours=rng.uniform(0.1, 48))
        row = (i, str(uuid.UUID(int=rng.getrandbits(128), version=4)), st, f"cam{rng.randrange(cameras[st])}",
               ts, ts + timedelta(seconds=rng.uniform(0.2, 3)), "1.2.0" if i < n * 2 // 3 else "1.3.0", reason,
               640, 480, f"{rng.getrandbits(256):064x}", rng.randint(30_000, 70_000), status,
               round(max_score, 4), reviewed_at, None)
        yield row, dets


def sqlite_ts(dt: datetime) -> str:
    """As SQLAlchemy stores a DateTime in SQLite (UTC, no offset): filters compare these strings."""
    return dt.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


SAMPLE_COLS = ("id", "sample_id", "station_id", "camera", "capture_ts", "received_at", "model_version", "reason",
               "width", "height", "image_sha256", "image_bytes", "status", "max_score", "reviewed_at", "reviewed_by")
DET_COLS = ("id", "sample_pk", "cls", "score", "x1", "y1", "x2", "y2")
STATION_COLS = ("id", "site", "line", "station", "created_at")


def load(engine: Engine, n: int, seed: int) -> dict[str, Any]:
    end = datetime.now(UTC).replace(microsecond=0)
    t0 = time.perf_counter()
    pg = engine.dialect.name == "postgresql"
    raw = engine.raw_connection()
    n_dets = 0
    try:
        conn: Any = raw.driver_connection
        cur = conn.cursor()
        index_defs: list[tuple[str, str]] = []
        if pg:
            cur.execute("SET session_replication_role = replica")  # no FK triggers: the rows are consistent
            cur.execute("SET maintenance_work_mem = '256MB'")
            cur.execute("""SELECT indexname, indexdef FROM pg_indexes i WHERE schemaname = current_schema()
                           AND tablename IN ('samples', 'detections') AND NOT EXISTS (
                             SELECT 1 FROM pg_constraint c WHERE c.conname = i.indexname)""")
            index_defs = list(cur.fetchall())
            for name, _ in index_defs:
                cur.execute(f'DROP INDEX "{name}"')
            with cur.copy(f"COPY stations ({', '.join(STATION_COLS)}) FROM STDIN") as cp:
                for row in station_rows(end):
                    cp.write_row(row)
        else:
            cur.executemany(f"INSERT INTO stations ({', '.join(STATION_COLS)}) VALUES (?, ?, ?, ?, ?)",
                            [(*r[:4], sqlite_ts(r[4])) for r in station_rows(end)])
        bar = tqdm(total=n, desc="samples", unit="row", unit_scale=True, mininterval=2, file=sys.stderr)
        rows = generate(n, seed, end)
        done = 0
        while done < n:
            size = min(CHUNK, n - done)
            samples, dets = [], []
            for _ in range(size):
                s, d = next(rows)
                samples.append(s)
                dets.extend(d)
            n_dets += len(dets)
            if pg:
                with cur.copy(f"COPY samples ({', '.join(SAMPLE_COLS)}) FROM STDIN") as cp:
                    for row in samples:
                        cp.write_row(row)
                with cur.copy(f"COPY detections ({', '.join(DET_COLS)}) FROM STDIN") as cp:
                    for row in dets:
                        cp.write_row(row)
            else:
                cur.execute("BEGIN")
                cur.executemany(f"INSERT INTO samples ({', '.join(SAMPLE_COLS)}) VALUES ({', '.join('?' * 16)})",
                                [(*r[:4], sqlite_ts(r[4]), sqlite_ts(r[5]), *r[6:14],
                                  r[14] and sqlite_ts(r[14]), r[15]) for r in samples])
                cur.executemany(f"INSERT INTO detections ({', '.join(DET_COLS)}) VALUES ({', '.join('?' * 8)})", dets)
                cur.execute("COMMIT")
            done += size
            bar.update(size)
        bar.close()
        t_rows = time.perf_counter() - t0
        if pg:
            for name, ddl in index_defs:
                log(f"index {name}")
                cur.execute(ddl)
            for table in ("samples", "detections", "stations"):
                cur.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                            f"(SELECT max(id) FROM {table}))")
            cur.execute("RESET session_replication_role")
            conn.commit()
            conn.autocommit = True
            log("VACUUM ANALYZE")
            for table in ("stations", "samples", "detections"):
                cur.execute(f"VACUUM ANALYZE {table}")
            conn.autocommit = False
        else:
            cur.execute("ANALYZE")
        cur.close()
    finally:
        raw.close()
    total = time.perf_counter() - t0
    return {"samples": n, "detections": n_dets, "rows_s": round(t_rows, 1), "total_s": round(total, 1),
            "load_after": loadavg()}


def sync_indexes(engine: Engine) -> list[str]:
    """Create or drop indexes so that the database's match ``hub.tables`` (a reused schema made
    before an index change). Returns what was done."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from sqlalchemy.schema import CreateIndex

    done = []
    with engine.begin() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        for d in diffs:
            if not isinstance(d, tuple):
                continue
            if d[0] == "remove_index":
                conn.execute(text(f'DROP INDEX "{d[1].name}"'))
                done.append(f"dropped {d[1].name}")
            elif d[0] == "add_index":
                conn.execute(CreateIndex(d[1]))
                done.append(f"created {d[1].name}")
    if done and engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("ANALYZE samples"))
            conn.execute(text("ANALYZE detections"))
    return done
