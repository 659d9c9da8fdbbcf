"""The peer for ``bench/streams.py``: Ultralytics' own multi-stream source on the same streams.

A user who wants N cameras through YOLO without LineGuard writes the N stream URLs into a
``.streams`` file and calls ``model.predict(source="cams.streams", stream=True)``: Ultralytics'
``LoadStreams`` opens one decoder thread per stream, and each ``next()`` takes the newest frame of
every stream as one batch of N. Live cameras deliver at their frame rate, a file as fast as it
decodes, so each file here is played as a live camera: the decoder thread is paced at the video's
frame rate and loops at the end (``LoadStreams.update`` replaced by a paced copy; nothing else of
Ultralytics changed). Latency is capture -> result, as in ``bench/streams.py``.

    python bench/streams_ultralytics.py --streams 8 16 32 --seconds 15 --json out/bench/streams_ultralytics.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
from _common import emit_json  # noqa: E402  (bench/, first on sys.path)

from models.bundle import load_bundle  # noqa: E402
from models.offline import configure_offline, patch_ultralytics  # noqa: E402


def paced_update(capture_times: dict[int, float]) -> Any:
    """A copy of ``LoadStreams.update`` that plays a file as a camera: one frame per 1/fps, looping."""
    import cv2

    def update(self: Any, i: int, cap: Any, stream: str | int) -> None:
        period = 1.0 / (self.fps[i] or 30.0)
        next_t = time.monotonic()
        while self.running:
            ok = cap.grab()
            if not ok:  # end of the file: a camera never ends, so start again
                cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
                continue
            ok, im = cap.retrieve()
            if not ok or im is None:
                continue
            capture_times[id(im)] = time.monotonic()
            self.imgs[i] = [im]  # buffer=False: the newest frame only, as Ultralytics keeps it
            next_t += period
            delay = next_t - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            else:
                next_t = time.monotonic()  # behind: do not burst to catch up

    return update


def run(model: Any, video: Path, streams: int, seconds: float, imgsz: int, device: str, half: bool,
        conf: float) -> dict[str, Any]:
    import ultralytics.data.loaders as loaders

    capture_times: dict[int, float] = {}
    loaders.LoadStreams.update = paced_update(capture_times)  # type: ignore[method-assign]
    lst = Path(tempfile.mkdtemp()) / "cams.streams"
    lst.write_text("\n".join([str(video.resolve())] * streams) + "\n")
    latencies: list[float] = []
    batches = 0
    frames = 0
    gen = model.predict(str(lst), stream=True, imgsz=imgsz, device=device, half=half, conf=conf, verbose=False)
    t0 = None
    for results in _batched(gen, streams):
        now = time.monotonic()
        if t0 is None:  # the first batch includes opening N decoders and warm-up: not counted
            t0 = now
            continue
        batches += 1
        frames += len(results)
        for r in results:
            t = capture_times.pop(id(r.orig_img), None)
            if t is not None:
                latencies.append(1000 * (now - t))
        if now - t0 >= seconds:
            break
    elapsed = time.monotonic() - (t0 or time.monotonic())
    ds = getattr(model.predictor, "dataset", None)
    if ds is not None:
        ds.close()
    fps = frames / elapsed if elapsed > 0 else 0.0
    return {
        "streams": streams,
        "offered_fps": round(streams * 30.0, 1),
        "processed_fps": round(fps, 1),
        "per_stream_fps": round(fps / streams, 2),
        "batch": streams,
        "latency_p50_ms": round(float(np.percentile(latencies, 50)), 1) if latencies else None,
        "latency_p99_ms": round(float(np.percentile(latencies, 99)), 1) if latencies else None,
        "frames": frames,
        "frames_with_latency": len(latencies),
        "seconds": round(elapsed, 1),
    }


def _batched(gen: Any, n: int) -> Any:
    """Ultralytics yields one Results per image of a batch; group them back into batches of n."""
    buf: list[Any] = []
    for r in gen:
        buf.append(r)
        if len(buf) == n:
            yield buf
            buf = []


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=Path("models/default"))
    ap.add_argument("--video", type=Path, default=Path("sample_data/line_1080p.mp4"))
    ap.add_argument("--streams", type=int, nargs="+", default=[8, 16, 32, 48, 64])
    ap.add_argument("--seconds", type=float, default=15.0, help="measured seconds per number of streams")
    ap.add_argument("--device", default="0", help="Ultralytics device: 0 (first GPU) or cpu")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    configure_offline()
    from ultralytics import YOLO

    patch_ultralytics()
    bundle = load_bundle(args.bundle, roles=("checkpoint",))
    imgsz = int(max(bundle.manifest.input_size))  # 1920x1080 -> 544x960 (rect), as the bundle's input
    conf = float((bundle.manifest.postprocessing or {}).get("operating_conf", 0.25))
    half = args.device != "cpu"
    model = YOLO(str(bundle.path("checkpoint")))
    rows = []
    for n in args.streams:
        row = run(model, args.video, n, args.seconds, imgsz, args.device, half, conf)
        print(json.dumps(row), flush=True)
        rows.append(row)
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "peer": "ultralytics predict(stream=True) on a .streams source, FP16" if half else "ultralytics, CPU",
        "imgsz": imgsz, "video": str(args.video), "steps": rows,
    }
    emit_json(result, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
