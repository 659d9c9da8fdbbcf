import logging
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from edge_agent.outbox import OutboxError, OutboxFullError, SampleOutbox

TOPIC = "lineguard/v1/p/l/s/samples"


def ids(items: list) -> list[str]:
    return [i.sample_id for i in items]


def test_put_is_idempotent_and_peek_is_oldest_first(tmp_path: Path) -> None:
    with SampleOutbox(tmp_path / "o.db") as box:
        assert box.put("a", TOPIC, b"1" * 10)
        assert box.put("b", TOPIC, b"2" * 20)
        assert not box.put("a", TOPIC, b"other payload")  # same id: nothing changes
        assert box.put("c", TOPIC, b"3" * 30)
        assert (box.depth, box.total_bytes) == (3, 60)
        items = box.peek(10)
        assert ids(items) == ["a", "b", "c"]
        assert items[0].payload == b"1" * 10 and items[0].topic == TOPIC
        assert ids(box.peek(2)) == ["a", "b"]
        assert ids(box.peek(10, after_seq=items[0].seq)) == ["b", "c"]
        assert box.mark_delivered(["b", "unknown", "b"]) == 1
        assert (box.depth, box.total_bytes) == (2, 40)
        assert "b" not in box and "a" in box
        assert ids(box.peek(10)) == ["a", "c"]
        assert box.mark_delivered([]) == 0


def test_contents_and_counters_survive_reopen(tmp_path: Path) -> None:
    with SampleOutbox(tmp_path / "o.db", quota_bytes=100) as box:
        for i in range(12):
            box.put(f"s{i}", TOPIC, bytes(10))
        box.mark_delivered(["s5"])
    with SampleOutbox(tmp_path / "o.db", quota_bytes=100) as box:
        assert box.evicted == 2
        assert (box.depth, box.total_bytes) == (9, 90)
        assert ids(box.peek(100)) == [f"s{i}" for i in (2, 3, 4, 6, 7, 8, 9, 10, 11)]
    con = sqlite3.connect(tmp_path / "o.db")
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    con.close()


CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from edge_agent.outbox import SampleOutbox
    box = SampleOutbox(sys.argv[1])
    for i in range(int(sys.argv[2])):
        box.put(f"id-{i}", "t", os.urandom(1000))
        print(i, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # no close(), no checkpoint
    """
)


def test_every_put_that_returned_survives_sigkill(tmp_path: Path) -> None:
    db = tmp_path / "o.db"
    proc = subprocess.run([sys.executable, "-c", CHILD, str(db), "50"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    acknowledged = [int(x) for x in proc.stdout.split()]
    assert acknowledged == list(range(50))
    assert (tmp_path / "o.db-wal").exists()  # the rows are in the WAL, never checkpointed
    with SampleOutbox(db) as box:
        assert box.depth == 50
        assert ids(box.peek(100)) == [f"id-{i}" for i in range(50)]
        assert box.total_bytes == 50_000


def test_quota_evicts_oldest_keeps_newest_and_logs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="edge_agent.outbox")
    with SampleOutbox(tmp_path / "o.db", quota_bytes=10_000) as box:
        for i in range(10):
            assert box.put(f"s{i:02d}", TOPIC, bytes(1000))
        assert (box.evicted, box.depth) == (0, 10)
        assert not caplog.records
        box.put("s10", TOPIC, bytes(1000))
        assert box.evicted == 1
        box.put("big", TOPIC, bytes(3500))  # needs four slots
        assert box.evicted == 5
        assert ids(box.peek(100)) == [f"s{i:02d}" for i in range(5, 11)] + ["big"]
        assert box.total_bytes == 9500 <= box.quota_bytes
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert "evicted the 1 oldest samples (1000 bytes: s00)" in warnings[0].getMessage()
    assert "evicted the 4 oldest samples (4000 bytes: s01, s02, s03, s04)" in warnings[1].getMessage()
    assert "5 evicted in total" in warnings[1].getMessage()


def test_payload_larger_than_quota_is_refused(tmp_path: Path) -> None:
    with SampleOutbox(tmp_path / "o.db", quota_bytes=1000) as box:
        box.put("keep", TOPIC, bytes(500))
        with pytest.raises(OutboxError, match="exceeds the whole quota of 1000 bytes"):
            box.put("huge", TOPIC, bytes(1001))
        assert ids(box.peek(10)) == ["keep"] and box.evicted == 0


def test_full_file_raises_clear_error_and_never_corrupts(tmp_path: Path) -> None:
    db = tmp_path / "o.db"
    with SampleOutbox(db, max_file_bytes=256 * 1024) as box:
        stored = 0
        with pytest.raises(OutboxFullError, match="full .*nothing was written"):
            for i in range(1000):
                box.put(f"s{i}", TOPIC, os.urandom(10_000))
                stored += 1
        assert 5 < stored < 30
        assert box.depth == stored and box.total_bytes == stored * 10_000
        assert f"s{stored}" not in box
        # still usable: delivering makes room again
        box.mark_delivered([f"s{i}" for i in range(5)])
        assert box.put("after", TOPIC, os.urandom(10_000))
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert con.execute("SELECT COUNT(*) FROM samples").fetchone()[0] == stored - 5 + 1
    con.close()


def test_concurrent_producers_and_deliverer(tmp_path: Path) -> None:
    box = SampleOutbox(tmp_path / "o.db")
    delivered: list[str] = []
    done = threading.Event()

    def produce(t: int) -> None:
        for i in range(40):
            box.put(f"t{t}-{i}", TOPIC, bytes(100))

    def deliver() -> None:
        while not done.is_set() or box.depth:
            batch = box.peek(8)
            box.mark_delivered(ids(batch))
            delivered.extend(ids(batch))

    producers = [threading.Thread(target=produce, args=(t,)) for t in range(6)]
    consumer = threading.Thread(target=deliver)
    consumer.start()
    for p in producers:
        p.start()
    for p in producers:
        p.join()
    done.set()
    consumer.join(30)
    assert box.depth == 0 and box.total_bytes == 0
    assert len(delivered) == len(set(delivered)) == 240
    assert sorted(delivered) == sorted(f"t{t}-{i}" for t in range(6) for i in range(40))
    box.close()
