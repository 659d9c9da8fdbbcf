"""How many split agents one head service keeps up with: simulated agents at a fixed frame rate.

Each simulated agent is its own MQTT client (as a real one is) publishing feature messages at
``--fps`` (codes the bundle's edge part made of sample-video frames, computed once before the run,
so only the hub side is measured) and listening to its ``split_results``. Steps add agents; per
step: answered frames/s against the offered rate, answer latency (publish -> answer received)
p50/p99, the share answered within ``--deadline-ms``, and the head batch sizes. The head service
runs in this process (``hub.server.start_heads``) on the broker at 127.0.0.1; the simulated agents
run in ``--procs`` other processes (so that their MQTT clients do not share the head's interpreter).

    python bench/split_heads.py --agents 1 2 4 --fps 30 --seconds 15 --json out/bench/split_heads.json
    python bench/split_heads.py --runtime torch --agents 8 16 32 --procs 4 ...   # a GPU hub
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from _common import emit_json, free_port, start_broker  # noqa: E402  (bench/, first on sys.path)
from tqdm import tqdm  # noqa: E402

from edge_agent.mqtt import MqttConfig, MqttTransport  # noqa: E402
from edge_agent.transport import Message, TransportError  # noqa: E402
from hub.core.config import build_config  # noqa: E402
from hub.server import start_heads  # noqa: E402
from lineguard_contract import StationId, Topics  # noqa: E402
from lineguard_contract.features import FeatureHeader, decode_split_result, encode_features  # noqa: E402
from models.bundle import load_bundle  # noqa: E402
from models.feature_codec import encode_codes  # noqa: E402
from models.processing import preprocess_batch  # noqa: E402
from models.split_runtime import SplitEdgeRunner  # noqa: E402


class SimAgent:
    def __init__(self, k: int, port: int, version: str, spec: Any, codes: list[bytes], fps: float,
                 deadline_ms: float) -> None:
        self.id = f"sim{k:03d}"
        self.station = StationId("bench", "line", self.id)
        topics = Topics()
        self.topic = topics.station(self.station, "features")
        self.version, self.spec, self.codes, self.fps, self.deadline_ms = version, spec, codes, fps, deadline_ms
        self.sent: dict[str, float] = {}
        self.rtt_ms: list[float] = []
        self.lock = threading.Lock()
        self.t = MqttTransport(MqttConfig(client_id=f"bench-{self.id}", port=port))
        self.t.subscribe(topics.station(self.station, "split_results"), self._on_result)
        self.t.start()
        deadline = time.monotonic() + 10
        while not self.t.connected:
            if time.monotonic() > deadline:
                raise SystemExit(f"{self.id}: cannot connect to the broker on port {port}")
            time.sleep(0.02)
        self.send_failures = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _on_result(self, topic: str, payload: bytes) -> None:
        now = time.monotonic()
        rid = decode_split_result(payload).request_id
        with self.lock:
            t0 = self.sent.pop(rid, None)
            if t0 is not None:
                self.rtt_ms.append(1000 * (now - t0))

    def _run(self) -> None:
        period, nxt, n = 1.0 / self.fps, time.monotonic(), 0
        while not self.stop.is_set():
            n += 1
            rid = f"{self.id}-{n}"
            h = FeatureHeader(request_id=rid, agent_id=self.id, camera="cam0", ts=time.time(),
                              bundle_version=self.version, cut=self.spec.cut, channels=self.spec.channels,
                              height=self.spec.height, width=self.spec.width, bits=self.spec.bits,
                              codec=self.spec.codec, deadline_ms=self.deadline_ms)
            data = encode_features(h, self.codes[n % len(self.codes)])
            with self.lock:
                self.sent[rid] = time.monotonic()
            try:
                self.t.publish(Message(self.topic, data, qos=0))
            except TransportError:
                self.send_failures += 1
            nxt += period
            self.stop.wait(max(0.0, nxt - time.monotonic()))

    def take(self) -> tuple[list[float], int]:
        """RTTs since the last call, and frames sent since then that got no answer (yet)."""
        with self.lock:
            rtt, self.rtt_ms = self.rtt_ms, []
            cutoff = time.monotonic() - 2 * self.deadline_ms / 1000
            lost = [r for r, t in self.sent.items() if t < cutoff]
            for r in lost:
                del self.sent[r]
        return rtt, len(lost)


def _agents_worker(ids: list[int], port: int, version: str, spec: Any, codes: list[bytes], fps: float,
                   deadline_ms: float, settle: float, seconds: float, out: Any) -> None:
    """One process of simulated agents for one step: settle, measure ``seconds``, report, stop."""
    agents = [SimAgent(k, port, version, spec, codes, fps, deadline_ms) for k in ids]
    for a in agents:
        a.thread.start()
    time.sleep(settle)
    for a in agents:
        a.take()
    t0 = time.monotonic()
    time.sleep(seconds)
    took = [a.take() for a in agents]
    elapsed = time.monotonic() - t0
    for a in agents:
        a.stop.set()
    for a in agents:
        a.thread.join(timeout=2)
        a.t.stop()
    out.put({"rtt": [v for r, _ in took for v in r], "lost": sum(lost for _, lost in took), "elapsed": elapsed})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=Path("models/default"))
    ap.add_argument("--video", type=Path, default=Path("sample_data/line_1080p.mp4"))
    ap.add_argument("--agents", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--procs", type=int, default=2, help="processes the simulated agents are spread over")
    ap.add_argument("--fps", type=float, default=30.0)
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--deadline-ms", type=float, default=250.0)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--runtime", choices=["onnx", "torch"], default="onnx", help="the head's runtime (heads.runtime)")
    ap.add_argument("--device", default="cuda", help="torch runtime: cuda or cpu")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    bundle = load_bundle(args.bundle, roles=("split_edge_int8",))
    edge = SplitEdgeRunner(bundle.path("split_edge_int8"), version=bundle.manifest.version)
    cap = cv2.VideoCapture(str(args.video))
    frames = []
    for i in range(0, 300, 10):
        cap.set(cv2.CAP_PROP_POS_FRAMES, i)
        ok, f = cap.read()
        if ok:
            frames.append(f)
    batch, _ = preprocess_batch(frames, tuple(bundle.manifest.input_size))
    codes = [encode_codes(c, edge.spec) for c in edge.run(batch)]
    work = Path(tempfile.mkdtemp(prefix="lg_split_heads_"))
    port = free_port()
    broker_name, stop_broker = start_broker(port, work)
    cfg = build_config({"data_dir": str(work / "hub"), "mqtt": {"url": f"mqtt://127.0.0.1:{port}"},
                        "heads": {"bundles": [str(args.bundle)], "max_batch": args.max_batch,
                                  "runtime": args.runtime, "device": args.device}})
    heads = start_heads(cfg, client_id="bench-heads")
    head = heads.service.heads[bundle.manifest.version]
    for k in (1, args.max_batch):  # warm up (CUDA context, kernels) before the first step
        head.detect(np.repeat(edge.run(batch[:1]), k, axis=0))
    ctx = mp.get_context("spawn")
    rows = []
    try:
        for n in tqdm(args.agents, desc="agents"):
            procs = max(1, min(args.procs, n))
            q = ctx.Queue()
            workers = [ctx.Process(target=_agents_worker, args=(list(range(n))[i::procs], port, bundle.manifest.version,
                                                                 edge.spec, codes, args.fps, args.deadline_ms, 3.0,
                                                                 args.seconds, q), daemon=True)
                       for i in range(procs)]
            sizes0 = dict(heads.service.stats()["batch_sizes"])
            for w in workers:
                w.start()
            got = [q.get(timeout=args.seconds + 60) for _ in workers]
            for w in workers:
                w.join(timeout=10)
            sizes = {k: v - sizes0.get(k, 0) for k, v in heads.service.stats()["batch_sizes"].items()}
            runs = sum(sizes.values())
            rtt = [v for g in got for v in g["rtt"]]
            lost = sum(g["lost"] for g in got)
            elapsed = float(np.mean([g["elapsed"] for g in got]))
            row = {"agents": n, "offered_fps": round(n * args.fps, 1), "answered_fps": round(len(rtt) / elapsed, 1),
                   "latency_p50_ms": round(float(np.percentile(rtt, 50)), 1) if rtt else None,
                   "latency_p99_ms": round(float(np.percentile(rtt, 99)), 1) if rtt else None,
                   "within_deadline": round(sum(v <= args.deadline_ms for v in rtt) / max(1, len(rtt) + lost), 3),
                   "unanswered": lost,
                   "mean_head_batch": round(sum(k * v for k, v in sizes.items()) / runs, 2) if runs else None}
            tqdm.write(json.dumps(row))
            rows.append(row)
    finally:
        heads.stop()
        stop_broker()
    result = {"date": datetime.now(UTC).isoformat(timespec="seconds"),
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "broker": broker_name, "bundle_version": bundle.manifest.version, "head": head.runner.provider,
              "agent_processes": args.procs, "fps_per_agent": args.fps,
              "deadline_ms": args.deadline_ms,
              "bytes_per_message": round(float(np.mean([len(c) for c in codes])) + 240),
              "steps": rows}
    emit_json(result, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
