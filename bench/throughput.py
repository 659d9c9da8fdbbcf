"""INT8 ONNX Runtime vs FP32 ONNX Runtime vs Ultralytics' own ``predict``, side by side.

Same weights (the bundle's checkpoint and its ONNX exports), same input size, same video,
same machine, in one run; each contender decodes, preprocesses, infers and post-processes
every frame, at batch 1. Ours decodes and letterboxes in a decoder thread (as the agent's capture
threads do) while the model runs; Ultralytics' ``predict(stream=True)`` has its own loader.
Reported as frames per second and as ratios to Ultralytics.

    python bench/throughput.py --bundle models/default --video sample_data/line_1080p.mp4
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import UTC, datetime
from itertools import islice
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import cpu_model  # noqa: E402
from tqdm import tqdm  # noqa: E402

from edge_agent.detector import OnnxDetector, detect_pipelined  # noqa: E402
from edge_agent.sources import VideoFileSource  # noqa: E402
from models.bundle import load_bundle  # noqa: E402


def run_ours(bundle_dir: Path, role: str, video: Path, frames: int, threads: int | None) -> float:
    """As ``lineguard-agent replay`` runs: decode and letterbox in the decoder thread, one frame
    per batch, up to one frame per ONNX Runtime session in flight, results in order."""
    bundle = load_bundle(bundle_dir, roles=(role,))
    det = OnnxDetector(bundle, role=role, threads=threads)
    det.load()
    n = 0
    t0 = time.perf_counter()
    source = VideoFileSource(video, transform=det.prepare)
    batches = ([fr.prepared] for fr in islice(source, frames))
    for _ in tqdm(detect_pipelined(det, batches), total=frames, desc=f"{role} ({det.workers} sessions)", leave=False):
        n += 1
    source.close()
    return n / (time.perf_counter() - t0)


def run_ultralytics(checkpoint: Path, video: Path, frames: int, imgsz: int, conf: float) -> float:
    from models.offline import configure_offline, patch_ultralytics

    configure_offline()
    from ultralytics import YOLO

    patch_ultralytics()
    model = YOLO(str(checkpoint))
    warm = next(iter(VideoFileSource(video))).image
    model.predict(warm, imgsz=imgsz, device="cpu", verbose=False)
    n = 0
    t0 = time.perf_counter()
    for _ in tqdm(model.predict(str(video), stream=True, imgsz=imgsz, device="cpu", conf=conf, verbose=False),
                  total=frames, desc="ultralytics", leave=False):
        n += 1
        if n >= frames:
            break
    return n / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=Path("models/default"))
    ap.add_argument("--video", type=Path, default=Path("sample_data/line_1080p.mp4"))
    ap.add_argument("--frames", type=int, default=300)
    ap.add_argument("--threads", type=int, default=None, help="ORT threads per session (default: cores / sessions)")
    ap.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = ap.parse_args()

    bundle = load_bundle(args.bundle, roles=("onnx_int8", "onnx_fp32", "checkpoint"))
    # Ultralytics letterboxes a 1920x1080 frame at imgsz=960 to 544x960 (rect, stride 32): the same
    # input our bundle takes, so both run the same network on the same tensor size.
    imgsz = int(max(bundle.manifest.input_size))
    conf = float((bundle.manifest.postprocessing or {}).get("operating_conf", 0.25))
    fps = {
        "ultralytics_predict_pytorch": run_ultralytics(bundle.path("checkpoint"), args.video, args.frames,
                                                       imgsz, conf),
        "onnxruntime_fp32": run_ours(args.bundle, "onnx_fp32", args.video, args.frames, args.threads),
        "onnxruntime_int8": run_ours(args.bundle, "onnx_int8", args.video, args.frames, args.threads),
    }
    base = fps["ultralytics_predict_pytorch"]
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{cpu_model()}, {os.cpu_count()} cores",
        "video": str(args.video), "frames": args.frames, "imgsz": imgsz,
        "bundle_version": bundle.manifest.version,
        "fps": {k: round(v, 2) for k, v in fps.items()},
        "ratio_vs_ultralytics": {k: round(v / base, 2) for k, v in fps.items()},
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
