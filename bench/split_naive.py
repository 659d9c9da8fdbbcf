"""Bytes per frame of naive cuts (no bottleneck) of the default model, against the JPEG of the
same model-input frame: the baseline a learned bottleneck has to beat (issue 5).

For each candidate cut: the tensors that cross it (models.split.needed_outputs), their size at
8 bits per value (per-tensor min/max quantization), the same after zlib level 6, and the edge /
hub milliseconds of the torch parts on this CPU (batch 1, FP32). Frames: ``--frames`` frames of
the sample video, letterboxed to the bundle's input size. JPEG: quality 90 of that letterboxed
frame (what the agent would otherwise send).

    python bench/split_naive.py --frames 20 --json out/bench/split_naive.json
"""

from __future__ import annotations

import argparse
import json
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm import tqdm

from models.offline import configure_offline
from models.processing import letterbox
from models.split import needed_outputs, split_model

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, default=ROOT / "models/default/checkpoint.pt")
    ap.add_argument("--video", type=Path, default=ROOT / "sample_data/line_1080p.mp4")
    ap.add_argument("--frames", type=int, default=20)
    ap.add_argument("--imgsz", default="544x960", help="HxW of the model input")
    ap.add_argument("--cuts", default="2,4,6,9", help="comma-separated layer indices")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    h, w = (int(v) for v in args.imgsz.split("x"))
    torch.set_num_threads(2)
    configure_offline()
    from ultralytics import YOLO

    model = YOLO(str(args.checkpoint), task="detect").model.float().eval()
    cap = cv2.VideoCapture(str(args.video))
    frames = []
    step = max(1, int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) // args.frames)
    for i in range(args.frames):
        cap.set(cv2.CAP_PROP_POS_FRAMES, i * step)
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(letterbox(frame, (h, w))[0])
    jpeg = float(np.mean([len(cv2.imencode(".jpg", f, [cv2.IMWRITE_JPEG_QUALITY, 90])[1]) for f in frames]))
    rows = []
    for cut in tqdm([int(c) for c in args.cuts.split(",")], desc="cuts"):
        edge, hub, outputs = split_model(model, cut)
        raw, packed, edge_ms, hub_ms = [], [], [], []
        for f in frames:
            x = torch.from_numpy(f[:, :, ::-1].copy()).permute(2, 0, 1)[None].float() / 255
            with torch.no_grad():
                t0 = time.perf_counter()
                feats = edge(x)
                t1 = time.perf_counter()
                hub(*feats)
                t2 = time.perf_counter()
            edge_ms.append((t1 - t0) * 1e3)
            hub_ms.append((t2 - t1) * 1e3)
            data = b""
            for t in feats:
                a = t[0].numpy()
                lo, hi = float(a.min()), float(a.max())
                q = np.round((a - lo) / max(hi - lo, 1e-12) * 255).astype(np.uint8)
                data += q.tobytes()
            raw.append(len(data))
            packed.append(len(zlib.compress(data, 6)))
        rows.append({"cut": cut, "tensors": outputs, "shapes": [list(t.shape[1:]) for t in feats],
                     "bytes_int8": float(np.mean(raw)), "bytes_int8_zlib": float(np.mean(packed)),
                     "vs_jpeg_int8_zlib": float(np.mean(packed)) / jpeg,
                     "edge_ms_p50": float(np.median(edge_ms[1:] or edge_ms)),
                     "hub_ms_p50": float(np.median(hub_ms[1:] or hub_ms))})
    print(f"JPEG q90 of the {h}x{w} model input: {jpeg:,.0f} bytes/frame (mean of {len(frames)} frames)")
    print("| cut | tensors (layers) | int8 bytes | int8+zlib bytes | vs JPEG | edge ms | hub ms |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['cut']} | {r['tensors']} {r['shapes']} | {r['bytes_int8']:,.0f} | {r['bytes_int8_zlib']:,.0f} | "
              f"{r['vs_jpeg_int8_zlib']:.1f}x | {r['edge_ms_p50']:.0f} | {r['hub_ms_p50']:.0f} |")
    assert needed_outputs(model.model, 9) == [4, 6, 9]
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"jpeg_q90_bytes": jpeg, "frames": len(frames), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
