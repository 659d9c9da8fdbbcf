"""Accuracy of a bundle on the held-out test split, against the targets the field quotes.

Both ONNX models of the bundle (FP32 and the INT8 one the agents run) predict every test image
once; from those detections come box mAP50 / mAP50-95 (Ultralytics' definition, NMS conf 0.001,
IoU 0.7, multi-label as ``yolo val``) and the part-level figures at the bundle's operating
threshold (chosen on the validation split at build time; the test split is never used to tune).

Targets (issue 2): INT8 mAP50 >= 0.95; part-level recall >= 98.7% with false alarms on <= 0.3% of
good parts, over >= 1,000 good parts; INT8 mAP50 within 1.0 point of FP32.

    python bench/accuracy.py --bundle models/default --data data/synth/dataset \
        --json out/bench/accuracy.json --plot docs/img/part_level_curve.png

Exit status 0 whether or not targets are met (it is a measurement); ``--strict`` makes a missed
target exit 1.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
from _common import emit_json  # noqa: E402  (bench/, first on sys.path)

from models.bundle import load_bundle  # noqa: E402
from models.dataset_io import load_dataset  # noqa: E402
from models.evaluate import OnnxPredictor, evaluate_predictions, predict_split  # noqa: E402
from models.metrics import part_level  # noqa: E402

ROLES = ("onnx_fp32", "onnx_int8")
TARGETS = {"map50_min": 0.95, "recall_min": 0.987, "far_max": 0.003, "n_good_min": 1000, "int8_delta_max": 0.01}


def _curve(parts: list[Any], dets: list[Any], thresholds: np.ndarray) -> dict[str, list[float]]:
    rows = [part_level(parts, dets, float(t)) for t in thresholds]
    return {"conf": [float(t) for t in thresholds], "recall": [float(r["recall"]) for r in rows],
            "false_alarm_rate": [float(r["false_alarm_rate"]) for r in rows]}


def _plot(curves: dict[str, dict[str, list[float]]], operating: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for role, c in curves.items():
        (line,) = ax.plot(np.array(c["false_alarm_rate"]) * 100, np.array(c["recall"]) * 100, label=role, lw=1.5)
        i = int(np.argmin(np.abs(np.array(c["conf"]) - operating)))
        ax.plot(c["false_alarm_rate"][i] * 100, c["recall"][i] * 100, "o", ms=6, color=line.get_color())
    ax.axhline(TARGETS["recall_min"] * 100, color="grey", ls="--", lw=0.8)
    ax.axvline(TARGETS["far_max"] * 100, color="grey", ls="--", lw=0.8)
    ax.set_xlim(0, 1.0)
    ax.set_ylim(97, 100.1)
    ax.set_xlabel("good parts with a false alarm (%)")
    ax.set_ylabel("defective parts caught (%)")
    ax.set_title(f"Part level, test split, conf 0.05-0.80 (dots: operating conf {operating:.3f})", fontsize=10)
    ax.text(TARGETS["far_max"] * 100, 97.1, " target: <= 0.3% false alarms", fontsize=8, color="grey")
    ax.text(0.6, TARGETS["recall_min"] * 100 - 0.12, ">= 98.7% caught", fontsize=8, color="grey")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=Path("models/default"))
    ap.add_argument("--data", type=Path, default=Path("data/synth/dataset"))
    ap.add_argument("--split", default="test")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None, help="PNG of part-level recall vs false alarms")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = ap.parse_args()

    bundle = load_bundle(args.bundle, roles=ROLES)
    dataset = load_dataset(args.data)
    samples = dataset.split(args.split)
    parts = [s.parts for s in samples]
    operating = float((bundle.manifest.postprocessing or {}).get("operating_conf", 0.25))

    reports: dict[str, Any] = {}
    curves: dict[str, dict[str, list[float]]] = {}
    thresholds = np.round(np.arange(0.05, 0.801, 0.005), 3)
    for role in ROLES:
        predictor = OnnxPredictor(bundle.path(role), intra_op_threads=args.threads, multi_label=True)
        t0 = time.perf_counter()
        dets = predict_split(predictor, samples, progress=True)
        report = evaluate_predictions(dataset, args.split, dets, operating_conf=operating)
        report.seconds = time.perf_counter() - t0
        reports[role] = report.to_dict()
        curves[role] = _curve(parts, dets, thresholds)

    int8, fp32 = reports["onnx_int8"], reports["onnx_fp32"]
    pl = int8["part_level"]
    checks = {
        "int8_map50>=0.95": int8["map50"] >= TARGETS["map50_min"],
        "part_recall>=98.7%": pl["recall"] >= TARGETS["recall_min"],
        "false_alarms<=0.3%": pl["false_alarm_rate"] <= TARGETS["far_max"],
        "good_parts>=1000": pl["n_good"] >= TARGETS["n_good_min"],
        "int8_vs_fp32_map50_within_1pt": abs(int8["map50"] - fp32["map50"]) <= TARGETS["int8_delta_max"],
    }
    # Where on the test curve both part-level targets would hold (for the notes, not for tuning).
    c = curves["onnx_int8"]
    feasible = [t for t, r, f in zip(c["conf"], c["recall"], c["false_alarm_rate"], strict=True)
                if r >= TARGETS["recall_min"] and f <= TARGETS["far_max"]]
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "bundle": str(args.bundle), "bundle_version": bundle.manifest.version,
        "data": str(args.data), "split": args.split, "n_images": len(samples),
        "operating_conf": operating,
        "onnx_int8": {k: int8[k] for k in ("map50", "map50_95", "precision", "recall", "part_level", "per_class")},
        "onnx_fp32": {k: fp32[k] for k in ("map50", "map50_95", "precision", "recall", "part_level")},
        "int8_minus_fp32_map50": int8["map50"] - fp32["map50"],
        "test_thresholds_meeting_both_part_targets": [min(feasible), max(feasible)] if feasible else None,
        "targets": checks,
        "all_targets_met": all(checks.values()),
    }
    emit_json(result, args.json)
    if args.plot:
        _plot(curves, operating, args.plot)
        print(f"plot: {args.plot}", file=sys.stderr)
    return 1 if args.strict and not result["all_targets_met"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
