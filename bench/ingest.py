"""Hub ingest through a real broker: sustained samples/s stored into SQLite or PostgreSQL.

Starts its own Mosquitto on a free port, K :class:`hub.ingest.IngestWorker` processes (distinct
client ids, one shared group) writing to the chosen database, and a load generator process that
publishes valid contract ``SamplePayload`` messages (QoS 1) as N simulated agents, each its own
paho client on its own station topic. Every sample has a new ``sample_id`` and its own ~50 KB JPEG
(one image made once with OpenCV; a counter in a JPEG comment segment makes each blob differ).
The generator keeps at most ``--max-backlog`` samples published but not yet stored (a closed
loop: the broker never queues without bound), or paces to ``--rate``.

Reported: stored samples/s over a steady window after a warm-up, the CPU of each process
(workers, broker, generator, PostgreSQL) and of the whole machine in that window, the load
average, and a final check that the database holds exactly the samples published (no loss, no
duplicates). PostgreSQL runs in a fresh schema, dropped after; everything else in a temporary
directory, removed after.

    python bench/ingest.py --db postgresql --workers 2 --agents 20 --json out/bench/ingest_pg.json
    python bench/ingest.py --db sqlite --workers 1 --agents 20 --json out/bench/ingest_sqlite.json
"""

from __future__ import annotations

import argparse
import base64
import json
import multiprocessing as mp
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import cpu_model  # noqa: E402
from _ingest_env import cpu_seconds, machine_cpu, postgres_pids, prepare_db, start_mosquitto, stored  # noqa: E402
from tqdm import tqdm  # noqa: E402

from lineguard_contract import Detection, SamplePayload, StationId, Topics, decode, encode  # noqa: E402

TOPICS = Topics()
ID_PLACEHOLDER = "00000000-0000-4000-8000-000000000000"
COUNTER_BYTES = 12  # in the JPEG comment at byte offset 6: both multiples of 3, so its base64 is separable
KEYS = ("stored", "duplicate", "dead_letter", "errors")  # the worker counters shared with the main process


# -- payloads -------------------------------------------------------------------------------------
def make_jpeg(target_bytes: int, seed: int = 0) -> bytes:
    """A 640x480 textured JPEG of about ``target_bytes``, with a COM segment (``FF FE``, length,
    COUNTER_BYTES zero bytes) right after SOI, for :class:`SampleTemplate` to overwrite."""
    import cv2
    import numpy as np

    img = cv2.GaussianBlur(np.random.default_rng(seed).integers(0, 255, (480, 640, 3), dtype=np.uint8), (0, 0), 1.5)
    encoded = [cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, q])[1].tobytes() for q in range(20, 100, 2)]
    best = min(encoded, key=lambda b: abs(len(b) - target_bytes))
    return best[:2] + b"\xff\xfe" + (COUNTER_BYTES + 2).to_bytes(2, "big") + bytes(COUNTER_BYTES) + best[2:]


class SampleTemplate:
    """An encoded sample of one station, split where the sample id and the image counter go:
    ``render(n)`` is a valid payload with a fresh sample id and a JPEG unique to ``n``."""

    def __init__(self, station: StationId, jpeg: bytes, n_dets: int) -> None:
        data = encode(SamplePayload(
            sample_id=ID_PLACEHOLDER, site=station.site, line=station.line, station=station.station, camera="cam0",
            capture_ts=1767225600.0, model_version="1.2.0", reason="defect", width=640, height=480, image=jpeg,
            detections=[Detection(cls="scratch", score=0.5 + i / 10, box=[10.0 * i, 20.0, 200.0, 300.0])
                        for i in range(n_dets)]))
        marker = base64.b64encode(bytes(COUNTER_BYTES))
        head, tail = data.split(ID_PLACEHOLDER.encode())
        i = tail.index(b'"image":"') + len(b'"image":"') + 8  # base64 of the first 6 bytes: SOI + COM header
        assert tail[i:i + len(marker)] == marker
        self.parts = (head, tail[:i], tail[i + len(marker):])

    def render(self, n: int) -> tuple[str, bytes]:
        sid = str(uuid.uuid4())
        head, mid, tail = self.parts
        return sid, b"".join((head, sid.encode(), mid, base64.b64encode(n.to_bytes(COUNTER_BYTES, "big")), tail))


# -- the processes --------------------------------------------------------------------------------
def worker_main(i: int, url: str, port: int, data_dir: str, kwargs: dict[str, Any], counters: Any,
                ready: Any, stop: Any) -> None:
    import logging

    from hub.blobs import FileBlobStore
    from hub.core.config import build_config
    from hub.ingest import IngestWorker

    logging.basicConfig(level=logging.WARNING, format=f"worker {i}: %(levelname)s %(name)s: %(message)s")
    config = build_config({"data_dir": data_dir, "database_url": url,
                           "mqtt": {"url": f"mqtt://127.0.0.1:{port}", "shared_group": "bench"}})
    kwargs = dict(kwargs)
    if not kwargs.pop("blob_fsync", True):
        kwargs["blobs"] = FileBlobStore(config.blob_dir, fsync=False)
    w = IngestWorker(config, client_id=f"bench-w{i}", migrate=False, **kwargs)
    w.start()
    if not w.wait_subscribed(30):
        raise SystemExit(f"worker {i} could not subscribe")
    ready.set()
    while True:
        stopping = stop.wait(0.1)
        if stopping:
            w.stop()
        c = w.counters()
        counters[len(KEYS) * i:len(KEYS) * (i + 1)] = [c[k] for k in KEYS]
        if stopping:
            return


def generator_main(port: int, n_agents: int, image_bytes: int, max_inflight: int, rate: float, max_backlog: int,
                   counters: Any, published: Any, acked: Any, stop: Any, ids_file: str) -> None:
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

    jpeg = make_jpeg(image_bytes)
    stations = [StationId("bench", f"line{a // 10}", f"st{a:03d}") for a in range(n_agents)]
    templates = [SampleTemplate(s, jpeg, n_dets=1 + a % 3) for a, s in enumerate(stations)]
    for t in templates[:3]:  # the spliced bytes are valid contract payloads with distinct images
        a, b = decode("samples", t.render(1)[1]), decode("samples", t.render(2)[1])
        assert a.image != b.image and a.sample_id != b.sample_id and len(a.image) == len(jpeg)
    lock = threading.Lock()

    def on_publish(client: Any, userdata: Any, mid: int, rc: Any, props: Any) -> None:
        with lock:
            acked.value += 1

    clients = []
    for a in range(n_agents):
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-agent-{a:03d}",
                        protocol=MQTTProtocolVersion.MQTTv311)
        c.max_inflight_messages_set(max_inflight)
        c.max_queued_messages_set(0)
        c.on_publish = on_publish
        c.connect("127.0.0.1", port, 30)
        c.loop_start()
        clients.append(c)
    topics = [TOPICS.station(s, "samples") for s in stations]
    done = lambda: sum(counters[len(KEYS) * w] + counters[len(KEYS) * w + 1]  # noqa: E731
                       for w in range(len(counters) // len(KEYS)))
    sent, t0 = 0, time.monotonic()
    with open(ids_file, "w") as ids:
        while not stop.is_set():
            if (rate > 0 and sent >= (time.monotonic() - t0) * rate) or sent - done() >= max_backlog:
                time.sleep(0.002)
                continue
            a = sent % n_agents
            sid, payload = templates[a].render(sent)
            clients[a].publish(topics[a], payload, qos=1)
            ids.write(sid + "\n")
            sent += 1
            published.value = sent
    deadline = time.monotonic() + 60
    while acked.value < sent and time.monotonic() < deadline:
        time.sleep(0.05)
    for c in clients:
        c.disconnect()
        c.loop_stop()


# -- the run --------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict[str, Any]:
    load_start = os.getloadavg()
    workdir = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    ctx = mp.get_context("spawn")
    broker, port = start_mosquitto(workdir, args.broker_inflight, args.broker_persistence)
    url, backend, cleanup = prepare_db(args.db, workdir)
    if args.blob_dirs_exist:
        for a in range(256 * 256):
            (workdir / "hub" / "blobs" / f"{a >> 8:02x}" / f"{a & 255:02x}").mkdir(parents=True)
    kwargs = {k: v for k, v in (("batch_max", args.batch_max), ("batch_ms", args.batch_ms)) if v is not None}
    kwargs |= {"blob_fsync": False} if args.no_fsync else {}
    counters = ctx.Array("q", len(KEYS) * args.workers, lock=False)
    published, acked = ctx.Value("q", 0, lock=False), ctx.Value("q", 0, lock=False)
    stop_workers, stop_gen = ctx.Event(), ctx.Event()
    readies = [ctx.Event() for _ in range(args.workers)]
    workers = [ctx.Process(target=worker_main, args=(i, url, port, str(workdir / "hub"), kwargs, counters, readies[i],
                                                     stop_workers)) for i in range(args.workers)]
    ids_file = workdir / "published.txt"
    total = lambda key="stored": sum(counters[len(KEYS) * w + KEYS.index(key)]  # noqa: E731
                                     for w in range(args.workers))
    try:
        for w in workers:
            w.start()
        if not all(r.wait(60) for r in readies):
            raise RuntimeError("a worker did not come up")
        gen = ctx.Process(target=generator_main, args=(
            port, args.agents, int(args.image_kb * 1000), args.agent_inflight, args.rate, args.max_backlog,
            counters, published, acked, stop_gen, str(ids_file)))
        gen.start()
        while total() == 0:
            if not gen.is_alive():
                raise RuntimeError("the load generator died")
            time.sleep(0.02)
        t_first = time.monotonic()
        time.sleep(args.warmup)
        t0, n0 = time.monotonic(), total()
        pids = {"workers": [w.pid for w in workers], "broker": [broker.pid], "generator": [gen.pid],
                "postgres (all processes)": postgres_pids() if backend == "postgresql" else []}
        cpu0, machine0 = {k: {p: cpu_seconds(p) for p in v} for k, v in pids.items()}, machine_cpu()
        spy = [shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy"), "record", "--duration",
               str(round(args.duration)), "--rate", "200", "--format", "raw", "--threads", "--nonblocking",
               *(["--gil"] if args.py_spy_gil else [])]
        spies = [subprocess.Popen([*spy, "--pid", str(pid), "-o", f"{args.py_spy}.w{i}.txt"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                 for i, pid in enumerate(pids["workers"])] if args.py_spy else []
        series, last_log = [], t0
        with tqdm(total=round(args.duration), unit="s", disable=args.quiet, desc=f"{backend} ingest") as bar:
            while (now := time.monotonic()) < t0 + args.duration:
                time.sleep(min(0.5, t0 + args.duration - now))
                n, t = total(), time.monotonic() - t0
                series.append((round(t, 2), n - n0))
                bar.n = round(t)
                bar.set_postfix(stored_per_s=round((n - n0) / t), backlog=published.value - n)
                if args.quiet and t - last_log >= 5:
                    last_log = t
                    print(f"  t={t:5.1f} s  stored {n - n0}  {(n - n0) / t:7.1f}/s  backlog {published.value - n}",
                          flush=True)
        t1, n1 = time.monotonic(), total()
        cpu1, machine1, load_end = {k: {p: cpu_seconds(p) for p in v} for k, v in pids.items()}, machine_cpu(), \
            os.getloadavg()
        for p in spies:
            p.wait(30)
        stop_gen.set()
        gen.join(90)
        sent = published.value
        deadline = time.monotonic() + 120
        while total() + total("duplicate") < sent and time.monotonic() < deadline:
            time.sleep(0.1)
        drained = time.monotonic() - t1
        stop_workers.set()
        for w in workers:
            w.join(60)
        ids, dead = stored(url)
        published_ids = ids_file.read_text().split()
    finally:
        stop_gen.set()
        stop_workers.set()
        for w in workers:
            w.join(10)
            if w.is_alive():
                w.kill()
        broker.terminate()
        broker.wait(10)
        try:
            cleanup()
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    window = t1 - t0
    r: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
                    "load_avg_start": [round(v, 2) for v in load_start],
                    "load_avg_end": [round(v, 2) for v in load_end]},
        "command": " ".join(["python", *sys.argv]), "db": backend, "workers": args.workers, "agents": args.agents,
        "image_bytes": len(make_jpeg(int(args.image_kb * 1000))), "payload_bytes": len(SampleTemplate(
            StationId("bench", "line0", "st000"), make_jpeg(int(args.image_kb * 1000)), 2).render(0)[1]),
        "worker_kwargs": kwargs, "blob_dirs_exist": args.blob_dirs_exist, "broker_inflight": args.broker_inflight,
        "broker_persistence": args.broker_persistence, "rate_offered": args.rate or None,
        "max_backlog": args.max_backlog, "warmup_s": round(t0 - t_first, 2), "window_s": round(window, 2),
        "stored_in_window": n1 - n0, "samples_per_s": round((n1 - n0) / window, 1),
        "cpu_cores_in_window": {k: round(sum(max(cpu1[k][p] - cpu0[k][p], 0.0) for p in v) / window, 3)
                                for k, v in cpu0.items()},
        "machine_busy_in_window": round((machine1[0] - machine0[0]) / (machine1[1] - machine0[1]), 3),
        "published": sent, "broker_acked": acked.value, "rows": len(ids), "distinct_ids": len(set(ids)),
        "published_ids_stored": len(set(ids) & set(published_ids)), "duplicates_counted": total("duplicate"),
        "dead_letters": dead, "errors": total("errors"), "drain_s": round(drained, 2), "series": series,
    }
    r["ok"] = bool(len(ids) == len(set(ids)) == sent == r["published_ids_stored"] == acked.value
                   == len(set(published_ids)) and dead == 0)
    return r


def print_table(r: dict[str, Any]) -> None:
    cores = r["cpu_cores_in_window"]
    rows = [
        ("database", r["db"]), ("workers / agents", f"{r['workers']} / {r['agents']}"),
        ("payload", f"{r['payload_bytes']} bytes (JPEG {r['image_bytes']})"),
        ("steady window", f"{r['window_s']} s after {r['warmup_s']} s warm-up"),
        ("stored samples/s", f"{r['samples_per_s']}"),
        ("CPU (cores) in window", ", ".join(f"{k} {v}" for k, v in cores.items())),
        ("machine busy in window", f"{100 * r['machine_busy_in_window']:.0f}% of {r['machine']['cores']} cores "
                                   f"(ours {sum(cores.values()):.2f} cores)"),
        ("published / rows / distinct", f"{r['published']} / {r['rows']} / {r['distinct_ids']}"),
        ("duplicates / dead / errors", f"{r['duplicates_counted']} / {r['dead_letters']} / {r['errors']}"),
        ("load average start / end", f"{r['machine']['load_avg_start']} / {r['machine']['load_avg_end']}"),
        ("check (no loss, no duplicates)", "OK" if r["ok"] else "FAILED"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db", default="sqlite", help="sqlite | postgresql (at $LINEGUARD_BENCH_PG) | a database URL")
    ap.add_argument("--workers", type=int, default=2, help="IngestWorker processes (one shared group)")
    ap.add_argument("--agents", type=int, default=20, help="simulated agents, one station topic each")
    ap.add_argument("--image-kb", type=float, default=50.0, help="JPEG size (KB of 1000 bytes)")
    ap.add_argument("--warmup", type=float, default=10.0, help="seconds after the first stored sample")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of the steady window")
    ap.add_argument("--rate", type=float, default=0.0, help="samples/s to offer (0: as many as are stored)")
    ap.add_argument("--max-backlog", type=int, default=2000, help="published but not yet stored, at most")
    ap.add_argument("--agent-inflight", type=int, default=16, help="unacknowledged publishes per agent")
    ap.add_argument("--broker-inflight", type=int, default=200,
                    help="mosquitto max_inflight_messages: unacknowledged deliveries per worker")
    ap.add_argument("--broker-persistence", action="store_true", help="mosquitto persistence on (autosave 30 s)")
    ap.add_argument("--batch-max", type=int, default=None, help="IngestWorker batch_max (default: the worker's)")
    ap.add_argument("--batch-ms", type=float, default=None, help="IngestWorker batch_ms (default: the worker's)")
    ap.add_argument("--no-fsync", action="store_true", help="blob store without fsync (to measure its cost)")
    ap.add_argument("--blob-dirs-exist", action="store_true",
                    help="make the blob store's 65,536 directories first, as in a hub that has stored a few "
                         "hundred thousand samples (default: a fresh store, each directory made on the way)")
    ap.add_argument("--py-spy", default=None, metavar="PREFIX",
                    help="sample each worker with py-spy over the window into PREFIX.w<i>.txt (collapsed stacks)")
    ap.add_argument("--py-spy-gil", action="store_true", help="py-spy: only samples holding the GIL (CPU)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("-q", "--quiet", action="store_true", help="log lines instead of a progress bar")
    args = ap.parse_args()
    result = run(args)
    print_table(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
