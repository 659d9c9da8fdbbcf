"""The review queue page against a large database: latency of ``GET /queue`` (HTML) and
``GET /api/v1/samples`` (JSON) per filter, through the real app, in-process.

Makes a fresh PostgreSQL schema (or uses ``--db URL``, PostgreSQL or SQLite), runs the Alembic
migrations, bulk-loads ``--samples`` samples (default 1,000,000) with realistic distributions
(2 sites x 5 lines x 4 stations, 2-4 cameras each, capture times over 90 days, reasons
defect/uncertain/random_negative 60/25/15%, 0-3 detections over 4 classes plus a rare one, 80% of
samples new and 20% reviewed), with COPY on PostgreSQL and secondary indexes built after the load;
then VACUUM ANALYZE. No image blobs: the queue page only links to them.

Then builds the hub app (``hub.api.create_app``), logs in a viewer through ``/login`` like a
browser, and times each filter of :data:`CASES` ``--requests`` times after ``--warmup`` requests,
with FastAPI's TestClient: p50 / p95 / max in ms, plus the time spent in SQL (statement
count and sum, from SQLAlchemy's cursor events). ``--explain`` prints EXPLAIN (ANALYZE, BUFFERS)
of every statement one request of each case issues.

Loading 1M rows takes a while; keep the schema for later runs:

    python bench/review_queue.py --schema bench_queue_1m --keep          # load, measure, keep
    python bench/review_queue.py --schema bench_queue_1m --reuse --keep  # measure again
    python bench/review_queue.py --schema bench_queue_1m --reuse         # measure, then drop it
    python bench/review_queue.py --db sqlite:///out/bench/queue.sqlite3 --samples 20000

With ``--reuse``, indexes that differ from ``hub.tables`` (after an index change) are created
or dropped to match before measuring.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _review_data import RARE_CLASS, load, loadavg, log, sync_indexes  # noqa: E402
from sqlalchemy import Engine, event, func, select, text  # noqa: E402

from hub.core.db import make_engine, normalize_url, upgrade  # noqa: E402
from hub.tables import Sample  # noqa: E402

PG_DEFAULT = os.environ.get("LINEGUARD_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/test")
PASSWORD = "bench password 1"
# (name, query parameters); "{since}" is replaced by the newest capture time minus 7 days.
CASES: list[tuple[str, dict[str, Any]]] = [
    ("no filter", {}),
    ("line", {"line": "lineC"}),
    ("station + status=new", {"site": "plant1", "line": "lineB", "station": "st02", "status": "new"}),
    ("class", {"cls": "crack"}),
    ("min_score", {"min_score": 0.9}),
    ("last 7 days", {"since": "{since}"}),
    ("line+class+status+min_score", {"line": "lineA", "cls": "dent", "status": "new", "min_score": 0.8}),
    ("deep page (status=new, page 50)", {"status": "new", "page": 50}),
    ("rare (class burr, line, new)", {"cls": RARE_CLASS, "line": "lineD", "status": "new"}),
]


# -- database setup ------------------------------------------------------------------------------
class Target:
    """The database to measure: a PostgreSQL schema (made and dropped here) or the URL given."""

    def __init__(self, db: str, schema: str | None) -> None:
        base = PG_DEFAULT if db == "postgresql" else db
        self.backend = normalize_url(base).get_backend_name()
        self.schema = None
        self.admin: Engine | None = None
        self.url = base
        if self.backend == "postgresql":
            self.schema = schema or f"bench_queue_{uuid.uuid4().hex[:10]}"
            if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", self.schema):
                raise SystemExit(f"bad schema name {self.schema!r}")
            self.admin = make_engine(base)
            self.url = normalize_url(base).update_query_dict(
                {"options": f"-csearch_path={self.schema}"}).render_as_string(hide_password=False)

    def exists(self) -> bool:
        if self.admin is None:
            db = normalize_url(self.url).database
            return bool(db) and Path(str(db)).exists()
        with self.admin.connect() as conn:
            return conn.scalar(text("SELECT count(*) FROM pg_namespace WHERE nspname = :s"), {"s": self.schema}) == 1

    def create(self) -> None:
        if self.admin is not None:
            with self.admin.begin() as conn:
                conn.execute(text(f'CREATE SCHEMA "{self.schema}"'))

    def drop(self) -> None:
        if self.admin is not None:
            with self.admin.begin() as conn:
                conn.execute(text(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE'))
        else:
            db = normalize_url(self.url).database
            for suffix in ("", "-wal", "-shm"):
                Path(f"{db}{suffix}").unlink(missing_ok=True)


# -- measuring -----------------------------------------------------------------------------------
class SqlTimer:
    """Every statement's text, parameters and duration, while ``on``."""

    def __init__(self, engine: Engine) -> None:
        self.on = False
        self.stmts: list[tuple[str, Any, float]] = []
        event.listen(engine, "before_cursor_execute", self._before)
        event.listen(engine, "after_cursor_execute", self._after)

    def _before(self, conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool) -> None:
        conn.info["bench_t0"] = time.perf_counter()

    def _after(self, conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool) -> None:
        if self.on:
            self.stmts.append((statement, params, time.perf_counter() - conn.info.pop("bench_t0")))


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(round(q * len(s) + 0.5)) - 1))]  # nearest rank


def login(client: Any) -> None:
    page = client.get("/login")
    m = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert m, page.text[:500]
    r = client.post("/login", data={"username": "bench_viewer", "password": PASSWORD, "csrf_token": m.group(1),
                                    "next": "/queue"}, follow_redirects=False)
    assert r.status_code == 303, r.text[:500]


def matched(path: str, r: Any) -> str:
    if path.startswith("/api"):
        body = r.json()
        return f"{body['total']}{'+' if body['total_capped'] else ''}"
    m = re.search(r"<p>(\d+)(\+?) samples; page", r.text)
    return f"{m.group(1)}{m.group(2)}" if m else "?"


def explain(engine: Engine, stmts: list[tuple[str, Any, float]]) -> None:
    raw = engine.raw_connection()
    try:
        cur = raw.driver_connection.cursor()  # type: ignore[union-attr]
        for stmt, params, dt in stmts:
            print(f"\n--- {dt * 1000:.1f} ms: {' '.join(stmt.split())[:300]}")
            if engine.dialect.name == "postgresql":
                cur.execute("EXPLAIN (ANALYZE, BUFFERS) " + stmt, params)
            else:
                cur.execute("EXPLAIN QUERY PLAN " + stmt, params)
            for row in cur.fetchall():
                print("    " + " | ".join(str(c) for c in row))
        raw.rollback()
    finally:
        raw.close()


def measure(url: str, requests: int, warmup: int, only: str | None, do_explain: bool) -> dict[str, Any]:
    from fastapi.testclient import TestClient

    from hub.accounts import AccountError, create_user
    from hub.api import HubContext, create_app
    from hub.blobs import FileBlobStore
    from hub.core.config import build_config
    from hub.core.db import make_session_factory
    from hub.review import known_classes

    tmp = tempfile.TemporaryDirectory(prefix="bench_queue_")
    config = build_config({"data_dir": tmp.name, "database_url": url, "mqtt": {"url": "mqtt://127.0.0.1:1"}})
    engine = make_engine(config.db_url)
    sessions = make_session_factory(engine)
    with sessions.begin() as s:
        with contextlib.suppress(AccountError):  # a reused database has it
            create_user(s, "bench_viewer", PASSWORD, "viewer")
        newest = s.scalar(select(func.max(Sample.capture_ts)))
    assert newest is not None, "no samples"
    if newest.tzinfo is None:  # SQLite
        newest = newest.replace(tzinfo=UTC)
    since = (newest - timedelta(days=7)).isoformat()
    ctx = HubContext(config, sessions, FileBlobStore(config.blob_dir, fsync=False))
    client = TestClient(create_app(ctx))
    login(client)
    timer = SqlTimer(engine)

    t = []
    for _ in range(5):
        with sessions() as s:
            t0 = time.perf_counter()
            classes = known_classes(s, fresh=True)
            t.append((time.perf_counter() - t0) * 1000)
    results: dict[str, Any] = {"known_classes_uncached_ms": {"p50": round(statistics.median(t), 2),
                                                             "max": round(max(t), 2), "classes": classes},
                               "cases": []}
    log(f"known_classes (uncached): {statistics.median(t):.1f} ms -> {classes}")
    for name, params in CASES:
        if only and not re.search(only, name):
            continue
        params = {k: (since if v == "{since}" else v) for k, v in params.items()}
        for path in ("/queue", "/api/v1/samples"):
            times, sql_ms, n_sql = [], [], []
            for i in range(warmup + requests):
                timer.stmts.clear()
                timer.on = True
                t0 = time.perf_counter()
                r = client.get(path, params=params)
                dt = (time.perf_counter() - t0) * 1000
                timer.on = False
                assert r.status_code == 200, (path, params, r.status_code, r.text[:300])
                if i >= warmup:
                    times.append(dt)
                    sql_ms.append(sum(x[2] for x in timer.stmts) * 1000)
                    n_sql.append(len(timer.stmts))
            row = {"case": name, "path": path, "params": params, "matched": matched(path, r), "n": len(times),
                   "p50_ms": round(pct(times, 0.5), 1), "p95_ms": round(pct(times, 0.95), 1),
                   "max_ms": round(max(times), 1), "sql_p50_ms": round(pct(sql_ms, 0.5), 1),
                   "sql_statements": int(statistics.median(n_sql)), "load": loadavg()}
            results["cases"].append(row)
            log(f"{name:34s} {path:16s} p50 {row['p50_ms']:7.1f}  p95 {row['p95_ms']:7.1f}  "
                f"max {row['max_ms']:7.1f}  sql {row['sql_p50_ms']:6.1f} ms ({row['sql_statements']} stmts)  "
                f"matched {row['matched']}")
            if do_explain and path == "/api/v1/samples":
                timer.stmts.clear()
                timer.on = True
                client.get(path, params=params)
                timer.on = False
                explain(engine, timer.stmts)
    client.close()
    engine.dispose()
    tmp.cleanup()
    return results


def table(res: dict[str, Any]) -> str:
    by_case: dict[str, dict[str, Any]] = {}
    for row in res["cases"]:
        by_case.setdefault(row["case"], {})[row["path"]] = row
    lines = ["| filter | matches | /queue p50 | /queue p95 | /queue max | API p50 | API p95 | SQL p50 (stmts) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, rows in by_case.items():
        q, a = rows.get("/queue"), rows.get("/api/v1/samples")
        if q is None or a is None:
            continue
        lines.append(f"| {name} | {a['matched']} | {q['p50_ms']:.1f} | **{q['p95_ms']:.1f}** | {q['max_ms']:.1f} | "
                     f"{a['p50_ms']:.1f} | {a['p95_ms']:.1f} | {q['sql_p50_ms']:.1f} ({q['sql_statements']}) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db", default="postgresql", help="'postgresql' (LINEGUARD_BENCH_PG or the test server) "
                                                         "or a database URL (postgresql://... or sqlite:///...)")
    ap.add_argument("--schema", help="PostgreSQL schema to use (default: a new bench_queue_<random>)")
    ap.add_argument("--samples", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--reuse", action="store_true", help="use the schema/file if it exists and has the samples")
    ap.add_argument("--keep", action="store_true", help="do not drop the schema/file at the end")
    ap.add_argument("--keep-indexes", action="store_true",
                    help="with --reuse: measure the indexes as they are (do not match them to hub.tables)")
    ap.add_argument("--requests", type=int, default=30, help="timed requests per filter and endpoint")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--only", help="regex: only the filters whose name matches")
    ap.add_argument("--explain", action="store_true", help="print EXPLAIN ANALYZE of each filter's statements")
    ap.add_argument("--count-cap", type=int, help="what-if: run with hub.review.COUNT_CAP set to this")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)

    if args.count_cap:
        import hub.review

        hub.review.COUNT_CAP = args.count_cap
    target = Target(args.db, args.schema)
    out: dict[str, Any] = {"bench": "review_queue", "date": datetime.now(UTC).isoformat(timespec="seconds"),
                           "backend": target.backend, "schema": target.schema, "samples": args.samples,
                           "count_cap": args.count_cap or "default",
                           "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                                       "python": platform.python_version()},
                           "load_start": loadavg()}
    log(f"{target.backend} {target.schema or target.url}")
    try:
        reused = False
        if args.reuse and target.exists():
            upgrade(target.url)
            engine = make_engine(target.url)
            with engine.connect() as conn:
                have = conn.scalar(select(func.count()).select_from(Sample))
            if have == args.samples:
                reused = True
                changed = [] if args.keep_indexes else sync_indexes(engine)
                log(f"reusing {have} samples; indexes: {', '.join(changed) or 'unchanged'}")
                out["index_changes"] = changed
            else:
                log(f"{target.schema or target.url} has {have} samples, not {args.samples}: loading anew")
            engine.dispose()
            if not reused:
                target.drop()
        if not reused:
            target.create()
            upgrade(target.url)
            engine = make_engine(target.url)
            log(f"loading {args.samples} samples")
            out["load"] = load(engine, args.samples, args.seed)
            engine.dispose()
            log(f"loaded: {out['load']}")
        out["load_before_measure"] = loadavg()
        out.update(measure(target.url, args.requests, args.warmup, args.only, args.explain))
        out["load_end"] = loadavg()
    finally:
        if not args.keep:
            log("dropping the benchmark data")
            target.drop()
        if target.admin is not None:
            target.admin.dispose()
    print()
    print(table(out))
    print(f"\nload average: start {out['load_start']}, before measuring {out.get('load_before_measure')}, "
          f"end {out.get('load_end')}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
