"""What a bundle's operating threshold decides: per-class recall, part-level recall and false
alarms on a dataset split at several thresholds, from one prediction pass (INT8, conf 0.001).

A candidate's threshold is the lowest whose false alarms on its validation good parts stay within
``target_far`` (``models.metrics.choose_operating_threshold``); with a few hundred good parts that
is just above the single highest-scoring good part, so it moves from run to run. This shows what
each threshold would have given on held-out frames.

    python bench/threshold_sweep.py --bundle runs/learning_cycle/porosity/bundles/1.3.0 \\
        --data runs/learning_cycle/field_porosity --thresholds 0.086,0.105,0.15,0.2,0.232
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import cpu_model, emit_json  # noqa: E402

from hub.gate import mapped_predictor, score_detections  # noqa: E402
from hub.gate_scoring import operating_conf  # noqa: E402
from models.bundle import load_bundle  # noqa: E402
from models.dataset_io import load_dataset  # noqa: E402
from models.evaluate import predict_split  # noqa: E402
from models.onnx_predict import OnnxPredictor  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True, help="a YOLO dataset directory")
    ap.add_argument("--split", default="test")
    ap.add_argument("--thresholds", default="0.05,0.1,0.15,0.2,0.25", help="comma-separated confidences")
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
    emit_json({"date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": cpu_model(),
               "bundle": str(args.bundle), "version": bundle.manifest.version, "data": str(args.data),
               "split": args.split, "images": len(dets), "rows": rows}, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
