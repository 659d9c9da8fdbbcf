"""Split mode against the full local model, end to end on loopback, side by side in one run.

Full: the bundle's INT8 model on this machine (``OnnxDetector``, one session). Split: the agent's
``SplitDetector`` (edge part INT8 here) -> MQTT broker on 127.0.0.1 -> the hub's head service
(``hub.server.start_heads``, hub part INT8) -> the answer back; both on the same machine, one frame
at a time, so a frame's latency is the whole chain (letterbox, edge, zlib, broker twice, decode,
head, NMS, box mapping). Frames: ``--frames`` of the sample video, each detected by both. The
broker: Mosquitto when installed, else the embedded one.

    python bench/split_latency.py --frames 100 --json out/bench/split_latency.json
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from _common import emit_json, free_port, start_broker  # noqa: E402  (bench/, first on sys.path)
from tqdm import tqdm  # noqa: E402

from edge_agent.detector import OnnxDetector  # noqa: E402
from edge_agent.mqtt import MqttConfig, MqttTransport  # noqa: E402
from edge_agent.split_detector import SplitDetector  # noqa: E402
from hub.core.config import build_config  # noqa: E402
from hub.server import start_heads  # noqa: E402
from lineguard_contract import StationId  # noqa: E402
from models.bundle import load_bundle  # noqa: E402


def pct(v: list[float], q: float) -> float:
    return round(float(np.percentile(v, q)), 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=Path("models/default"))
    ap.add_argument("--video", type=Path, default=Path("sample_data/line_1080p.mp4"))
    ap.add_argument("--frames", type=int, default=100)
    ap.add_argument("--in-process", action="store_true",
                    help="run the head service in this process (default: its own process, as on a hub)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    bundle = load_bundle(args.bundle, roles=("onnx_int8", "split_edge_int8", "split_hub"))
    cap = cv2.VideoCapture(str(args.video))
    frames = []
    while len(frames) < args.frames:
        ok, f = cap.read()
        if not ok:
            cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
            continue
        frames.append(f)
    work = Path(tempfile.mkdtemp(prefix="lg_split_lat_"))
    port = free_port()
    broker_name, stop_broker = start_broker(port, work)
    heads = None
    transport = None
    try:
        hub_cfg = {"data_dir": str(work / "hub"), "mqtt": {"url": f"mqtt://127.0.0.1:{port}"},
                   "heads": {"bundles": [str(args.bundle.resolve())], "max_delay_ms": 0}}
        if args.in_process:
            heads = start_heads(build_config(hub_cfg), client_id="bench-heads")
        else:
            import yaml

            (work / "hub.yaml").write_text(yaml.safe_dump(hub_cfg))
            proc = subprocess.Popen([sys.executable, "-m", "hub.cli", "heads", "-c", str(work / "hub.yaml")],
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            assert proc.stdout is not None
            proc.stdout.readline()  # "LineGuard head service running ..." once subscribed (or timed out)
            heads = proc
        transport = MqttTransport(MqttConfig(client_id="bench-agent", port=port))
        transport.start()
        while not transport.connected:
            time.sleep(0.02)
        full = OnnxDetector(bundle, workers=1)
        full.load()
        split = SplitDetector(bundle, transport, StationId("bench", "line", "st"), "bench-agent", mode="split",
                              deadline_ms=5000)
        split.load()
        split.detect(frames[:3])  # warm the head and the broker path
        lat: dict[str, list[float]] = {"full": [], "split": []}
        for f in tqdm(frames, desc="frames (full, split)"):
            for name, det in (("full", full), ("split", split)):
                t = time.perf_counter()
                det.detect([f])
                lat[name].append(1000 * (time.perf_counter() - t))
        st = split.stats()
        if st.get("undecided_frames"):
            raise SystemExit(f"split frames without an answer: {st}")
    finally:
        if transport is not None:
            transport.stop()
        if isinstance(heads, subprocess.Popen):
            heads.terminate()
            heads.wait(10)
        elif heads is not None:
            heads.stop()
        stop_broker()
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "broker": broker_name, "head_service": "in process" if args.in_process else "own process",
        "bundle_version": bundle.manifest.version, "frames": len(frames),
        "full_ms": {"p50": pct(lat["full"], 50), "p99": pct(lat["full"], 99), "mean": round(np.mean(lat["full"]), 1)},
        "split_ms": {"p50": pct(lat["split"], 50), "p99": pct(lat["split"], 99),
                     "mean": round(np.mean(lat["split"]), 1)},
        "bytes_per_frame": round(st["bytes_sent"] / st["messages_sent"]),
    }
    result["ratio_p50"] = round(result["split_ms"]["p50"] / result["full_ms"]["p50"], 2)
    result["ratio_p99"] = round(result["split_ms"]["p99"] / result["full_ms"]["p99"], 2)
    emit_json(result, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
