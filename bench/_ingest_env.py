"""What bench/ingest.py runs against: its own Mosquitto, a migrated database (a fresh PostgreSQL
schema, dropped after, or an SQLite file), the stored rows to check, and CPU counters from /proc.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

__all__ = ["PG_DEFAULT", "cpu_seconds", "machine_cpu", "postgres_pids", "prepare_db", "start_mosquitto", "stored"]

PG_DEFAULT = os.environ.get("LINEGUARD_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/test")
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


# -- broker and database --------------------------------------------------------------------------
def start_mosquitto(workdir: Path, inflight: int, persistence: bool) -> tuple[subprocess.Popen[bytes], int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    conf = workdir / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\nmax_inflight_messages {inflight}\n"
        "max_queued_messages 0\nmax_queued_bytes 0\nlog_dest stderr\nlog_type error\nlog_type warning\n"
        f"user {pwd.getpwuid(os.geteuid()).pw_name}\n"
        + (f"persistence true\npersistence_location {workdir}/\nautosave_interval 30\n" if persistence
           else "persistence false\n"))
    with (workdir / "mosquitto.log").open("ab") as log:
        proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=log, stderr=log)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"mosquitto did not start: {(workdir / 'mosquitto.log').read_text()}")


def prepare_db(db: str, workdir: Path) -> tuple[str, str, Any]:
    """(URL for the workers, backend name, cleanup callable); migrated to head."""
    from sqlalchemy import text

    from hub.core.db import make_engine, normalize_url, upgrade

    url = f"sqlite:///{workdir / 'hub.sqlite3'}" if db == "sqlite" else PG_DEFAULT if db == "postgresql" else db
    backend = normalize_url(url).get_backend_name()
    if backend != "postgresql":
        upgrade(url)
        return url, backend, lambda: None
    schema = f"bench_ingest_{uuid.uuid4().hex[:10]}"
    admin = make_engine(url)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    url = normalize_url(url).update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(
        hide_password=False)
    upgrade(url)

    def drop() -> None:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()

    return url, backend, drop


def stored(url: str) -> tuple[list[str], int]:
    """(the sample ids in ``samples``, one per row; rows in ``dead_letters``)."""
    from sqlalchemy import func, select

    from hub.core.db import make_engine
    from hub.tables import DeadLetter, Sample

    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return (list(conn.execute(select(Sample.sample_id)).scalars()),
                    int(conn.execute(select(func.count()).select_from(DeadLetter)).scalar_one()))
    finally:
        engine.dispose()



# -- CPU counters
def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` (0.0 when gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine since boot (/proc/stat; iowait counts as idle)."""
    v = [float(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    return sum(v) - v[3] - v[4], sum(v)


def postgres_pids() -> list[int]:
    def comm(p: Path) -> str:
        try:
            return (p / "comm").read_text().strip()
        except OSError:
            return ""

    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and comm(p) == "postgres"]
