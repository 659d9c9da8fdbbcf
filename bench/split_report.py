"""The split report: for each trained bottleneck (cut, width, bits), bytes per frame, edge ms,
hub ms and mAP50, next to the unsplit INT8 model and the JPEG of the same input, in one run.

Each bottleneck (``models/split_train.py`` output) is exported with the bundle's checkpoint into
its two ONNX parts (the edge part INT8, as the agent runs it; the hub part INT8, as the bundle
ships it) and evaluated through the wire codec on the same images as the unsplit INT8 model; the
same bottleneck with both parts FP32 is scored too (``map50_fp32``: what INT8 costs the split). Bytes: the zlib-packed
codes as sent; JPEG: quality 90 of each evaluated image letterboxed to the model input (what the
agent would send otherwise). Milliseconds: ONNX Runtime on this machine, batch 1, median.

    python bench/split_report.py --bottlenecks runs/split/*.pt --json docs/split_report.json \\
        --png docs/img/split_report.png
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from models.bundle import load_bundle  # noqa: E402
from models.dataset_io import YoloDataset, load_dataset  # noqa: E402
from models.evaluate import evaluate  # noqa: E402
from models.onnx_predict import OnnxPredictor  # noqa: E402
from models.processing import letterbox, preprocess_batch  # noqa: E402
from models.split_bundle import export_bottleneck  # noqa: E402
from models.split_runtime import SplitEdgeRunner, SplitHubRunner, SplitPredictor  # noqa: E402


def median_ms(fn: Any, arg: Any, n: int) -> float:
    fn(arg)
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn(arg)
        times.append(1000 * (time.perf_counter() - t))
    return round(float(np.median(times)), 1)


def plot(path: Path, rows: list[dict[str, Any]], base: dict[str, Any], jpeg: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, r in enumerate(sorted(rows, key=lambda r: r["bytes_per_frame"])):
        ax.scatter(r["bytes_per_frame"], 100 * r["map50"], c="C0")
        ax.annotate(f"{r['name']} ({100 * r['map50']:.1f})", (r["bytes_per_frame"], 100 * r["map50"]), fontsize=7,
                    xytext=(4, -12 + 9 * (i % 4)), textcoords="offset points")
    ax.scatter([jpeg], [100 * base["map50"]], marker="s", c="C1", label="unsplit INT8 (JPEG q90 uplink)")
    ax.axvline(0.25 * jpeg, ls="--", c="grey", label="25% of the JPEG")
    ax.axhline(100 * base["map50"] - 1.0, ls=":", c="red", label="unsplit INT8 mAP50 - 1 point")
    ax.set_xscale("log")
    ax.set_xlabel("bytes per frame sent (log)")
    ax.set_ylabel("mAP50 (%)")
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("Split inference: bytes per frame against mAP50", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=Path("models/default"))
    ap.add_argument("--bottlenecks", type=Path, nargs="+", default=[])
    ap.add_argument("--data", type=Path, default=Path("data/synth/dataset"))
    ap.add_argument("--split", default="val")
    ap.add_argument("--images", type=int, default=300, help="first N images of the split")
    ap.add_argument("--work", type=Path, default=Path("out/split"), help="where the exported parts go")
    ap.add_argument("--timing-frames", type=int, default=20)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--png", type=Path, default=None)
    ap.add_argument("--plot-only", type=Path, default=None, help="redraw --png from this report JSON, run nothing")
    args = ap.parse_args()
    if args.plot_only:
        old = json.loads(args.plot_only.read_text())
        plot(args.png, old["rows"], old["unsplit_int8"], old["jpeg_q90_bytes"])
        return 0

    bundle = load_bundle(args.bundle, roles=("onnx_fp32", "onnx_int8", "checkpoint"))
    imgsz = tuple(bundle.manifest.input_size)
    full = load_dataset(args.data, splits=[args.split])
    samples = full.split(args.split)[: args.images]
    ds = YoloDataset(full.root, full.names, {args.split: samples}, full.yaml_path)
    frames = [s.read() for s in samples[: args.timing_frames]]
    batch1 = preprocess_batch(frames[:1], imgsz)[0]
    jpeg = float(np.mean([len(cv2.imencode(".jpg", letterbox(s.read(), imgsz)[0], [cv2.IMWRITE_JPEG_QUALITY, 90])[1])
                          for s in tqdm(samples, desc="jpeg", leave=False)]))

    unsplit = OnnxPredictor(bundle.path("onnx_int8"), imgsz=imgsz)
    rep = evaluate(unsplit, ds, args.split, progress=False)
    rep_fp = evaluate(OnnxPredictor(bundle.path("onnx_fp32"), imgsz=imgsz), ds, args.split, progress=False)
    base = {"name": "unsplit INT8", "map50": round(rep.map50, 4), "map50_fp32": round(rep_fp.map50, 4),
            "bytes_per_frame": round(jpeg),
            "full_ms": median_ms(unsplit.raw, batch1, args.timing_frames)}
    print(f"unsplit INT8: mAP50 {rep.map50:.4f}, JPEG q90 {jpeg:,.0f} B/frame, {base['full_ms']} ms", flush=True)
    rows = []
    for bn_path in args.bottlenecks:
        name = bn_path.stem
        paths, _, _, _ = export_bottleneck(bundle, bn_path, args.work / name, args.data,
                                           version=bundle.manifest.version)
        edge, hub = SplitEdgeRunner(paths["split_edge_int8"]), SplitHubRunner(paths["split_hub"])
        pred = SplitPredictor(edge, hub, imgsz)  # type: ignore[arg-type]
        r = evaluate(pred, ds, args.split, progress=False)
        fp_paths, _, _, _ = export_bottleneck(bundle, bn_path, args.work / f"{name}-fp32", args.data,
                                              version=bundle.manifest.version, int8=False)
        fp_pred = SplitPredictor(SplitEdgeRunner(fp_paths["split_edge_fp32"]), SplitHubRunner(fp_paths["split_hub"]),
                                 imgsz)  # type: ignore[arg-type]
        r_fp = evaluate(fp_pred, ds, args.split, progress=False)
        codes = edge.run(batch1)
        row = {"name": name, "cut": edge.spec.cut, "width": edge.spec.channels, "bits": edge.spec.bits,
               "shape": list(edge.spec.shape), "bytes_per_frame": round(float(np.mean(pred.bytes_sent))),
               "vs_jpeg": round(float(np.mean(pred.bytes_sent)) / jpeg, 3), "map50": round(r.map50, 4),
               "map50_delta_points": round(100 * (r.map50 - rep.map50), 2), "map50_fp32": round(r_fp.map50, 4),
               "edge_ms": median_ms(edge.run, batch1, args.timing_frames),
               "hub_ms": median_ms(hub.run, codes, args.timing_frames)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    result = {"date": datetime.now(UTC).isoformat(timespec="seconds"),
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "bundle_version": bundle.manifest.version, "images": len(samples), "split": args.split,
              "jpeg_q90_bytes": round(jpeg), "unsplit_int8": base, "rows": rows}
    print("| bottleneck | cut | codes (C x h x w, bits) | bytes/frame | vs JPEG | mAP50 | vs unsplit INT8 "
          "| mAP50 FP32 parts | edge ms | hub ms |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| unsplit INT8 (JPEG q90 uplink) | - | - | {jpeg:,.0f} | 1.00 | {100 * base['map50']:.1f} | - | "
          f"{100 * base['map50_fp32']:.1f} | {base['full_ms']} (whole model) | - |")
    for r in rows:
        c, h, w = r["shape"]
        print(f"| {r['name']} | {r['cut']} | {c}x{h}x{w}, {r['bits']} | {r['bytes_per_frame']:,} | "
              f"{r['vs_jpeg']:.2f} | {100 * r['map50']:.1f} | {r['map50_delta_points']:+.1f} | "
              f"{100 * r['map50_fp32']:.1f} | {r['edge_ms']} | "
              f"{r['hub_ms']} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    if args.png:
        plot(args.png, rows, base, jpeg)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
