"""What a bundle's operating threshold decides: per-class recall, part-level recall and false
alarms on a dataset split at several thresholds, from one prediction pass (INT8, conf 0.001).

A candidate's threshold is the lowest whose false alarms on its validation good parts stay within
``target_far`` (``models.metrics.choose_operating_threshold``); with a few hundred good parts that
is just above the single highest-scoring good part, so it moves from run to run. This shows what
each threshold would have given on held-out frames. ``--validation-sizes`` shows how far that
choice moves: the threshold chosen (as the release step chooses it) on random subsets of that many
good parts of ``--split``, 1,000 draws each, and the false alarms each gives on all of them.

    python bench/threshold_sweep.py --bundle runs/learning_cycle/porosity/bundles/1.3.0 \\
        --data runs/learning_cycle/field_porosity --thresholds 0.086,0.105,0.15,0.2,0.232
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import cpu_model, emit_json  # noqa: E402

from hub.gate import mapped_predictor, score_detections  # noqa: E402
from hub.gate_scoring import operating_conf  # noqa: E402
from models.bundle import load_bundle  # noqa: E402
from models.dataset_io import load_dataset  # noqa: E402
from models.evaluate import predict_split  # noqa: E402
from models.metrics import part_scores, threshold_for_good_scores  # noqa: E402
from models.onnx_predict import OnnxPredictor  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True, help="a YOLO dataset directory")
    ap.add_argument("--split", default="test")
    ap.add_argument("--thresholds", default="0.05,0.1,0.15,0.2,0.25", help="comma-separated confidences")
    ap.add_argument("--validation-sizes", default="", help="comma-separated good-part counts, e.g. 224,500,1000")
    ap.add_argument("--target-far", type=float, default=0.002, help="the release step's (models/release.py)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    bundle = load_bundle(args.bundle, roles=("onnx_int8",))
    data = load_dataset(args.data)
    predict = mapped_predictor(OnnxPredictor(bundle.path("onnx_int8"), multi_label=True),
                               list(bundle.manifest.classes), list(data.names))
    dets = predict_split(predict, data.split(args.split), conf=0.001, progress=True)
    rows: list[dict[str, Any]] = []
    own = operating_conf(bundle)
    for conf in sorted({float(c) for c in args.thresholds.split(",")} | {own}):
        sc = score_detections(data, args.split, dets, conf)
        pl = sc.report.part_level
        rows.append({"conf": round(conf, 6), "bundle_threshold": conf == own,
                     "recall": {k: None if v is None else round(v, 4) for k, v in sc.recall_at_operating.items()},
                     "part_recall": round(pl["recall"], 4), "part_false_alarms": round(pl["false_alarm_rate"], 4),
                     "n_good": pl["n_good"], "n_defective": pl["n_defective"]})
        print(f"conf {conf:.3f}{' (bundle)' if conf == own else '         '}  "
              + "  ".join(f"{k} {v:.3f}" for k, v in sc.recall_at_operating.items() if v is not None)
              + f"  part recall {pl['recall']:.3f}  false alarms {pl['false_alarm_rate']:.4f}", file=sys.stderr)
    sizes = [int(k) for k in args.validation_sizes.split(",") if k]
    spread = _threshold_spread(data.split(args.split), dets, sizes, args.target_far) if sizes else None
    emit_json({"date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": cpu_model(),
               "bundle": str(args.bundle), "version": bundle.manifest.version, "data": str(args.data),
               "split": args.split, "images": len(dets), "rows": rows, "threshold_spread": spread}, args.json)
    return 0


def _threshold_spread(samples: list[Any], dets: list[Any], sizes: list[int], target_far: float,
                      draws: int = 1000) -> dict[str, Any]:
    """Thresholds chosen on random subsets of ``k`` good parts (5th / 50th / 95th percentile) and
    the false-alarm rate each gives on every good part of the split."""
    _, good = part_scores([s.parts for s in samples], dets)
    rng = np.random.default_rng(0)
    out: dict[str, Any] = {"good_parts": len(good), "target_far": target_far, "draws": draws}
    for k in sizes:
        if k > len(good):
            print(f"{k} good parts asked for, the split has {len(good)}: skipped", file=sys.stderr)
            continue
        allowed = int(np.floor(target_far * k + 1e-9))
        chosen = np.array([threshold_for_good_scores(rng.choice(good, k, replace=False), target_far)
                           for _ in range(draws)])
        far = np.array([(good >= c).mean() for c in chosen])  # a detection at the threshold alarms
        q = {p: round(float(np.percentile(chosen, p)), 4) for p in (5, 50, 95)}
        f = {p: round(float(np.percentile(far, p)), 4) for p in (5, 50, 95)}
        out[str(k)] = {"allowed_false_alarms": allowed, "threshold_p5_p50_p95": list(q.values()),
                       "false_alarms_p5_p50_p95": list(f.values())}
        print(f"{k} good parts ({allowed} alarms allowed): threshold {q[5]:.3f} / {q[50]:.3f} / {q[95]:.3f}, "
              f"false alarms on all {len(good)}: {f[5]:.4f} / {f[50]:.4f} / {f[95]:.4f} (p5 / p50 / p95)",
              file=sys.stderr)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
