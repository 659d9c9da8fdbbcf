"""How steady is the operating threshold a release picks on a validation split of a retraining job's size?

The release (:mod:`models.release`) sets ``operating_conf`` to the lowest confidence whose good-part
false-alarm rate on its validation split is <= ``target_far`` (0.2%). A retraining job validates on
~190 frames (~290 good parts on the default line): 0.2% of them is 0.6 parts, so no false alarm
is allowed and the threshold sits just above the single highest-scoring good part, an extreme
order statistic.

This draws ``--draws`` random validation splits of each ``--val-frames`` size from a dataset with
parts sidecars (default: the golden set's val split, with the production model's detections),
picks the threshold on each as the release does, and measures part-level recall and false alarms
on the frames left out: how far the line's operating point moves from one job to the next by the
draw of its validation frames alone, and how many validation frames steady it.

    python bench/operating_threshold.py --bundle models/default --json docs/results/operating_threshold_cpu.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
from _common import emit_json  # noqa: E402

from models.bundle import load_bundle  # noqa: E402
from models.dataset_io import load_dataset  # noqa: E402
from models.evaluate import predict_split  # noqa: E402
from models.metrics import choose_operating_threshold, part_level  # noqa: E402
from models.onnx_predict import OnnxPredictor  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _summary(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {"mean": round(float(a.mean()), 5), "sd": round(float(a.std()), 5),
            "p05": round(float(np.percentile(a, 5)), 5), "p50": round(float(np.percentile(a, 50)), 5),
            "p95": round(float(np.percentile(a, 95)), 5)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    bundle = load_bundle(Path(args.bundle), roles=("onnx_int8",))
    data = load_dataset(Path(args.data), splits=[args.split])
    samples = [s for s in data.split(args.split) if s.parts]
    pred = OnnxPredictor(bundle.path("onnx_int8"), conf=0.001, multi_label=True)
    dets = predict_split(pred, samples, conf=0.001, progress=True)
    parts = [s.parts for s in samples]
    full = part_level(parts, dets, bundle.manifest.postprocessing.get("operating_conf") or 0.25)
    rng = np.random.default_rng(args.seed)
    sizes: dict[str, Any] = {}
    for size in args.val_frames:
        m: dict[str, list[float]] = {"conf": [], "recall": [], "far": []}
        for _ in range(args.draws):
            idx = rng.permutation(len(samples))
            val, test = idx[:size], idx[size:]
            conf = choose_operating_threshold([parts[i] for i in val], [dets[i] for i in val],
                                              target_far=args.target_far)
            pl = part_level([parts[i] for i in test], [dets[i] for i in test], conf)
            m["conf"].append(conf)
            m["recall"].append(float(pl["recall"]))
            m["far"].append(float(pl["false_alarm_rate"]))
        sizes[str(size)] = {k: _summary(v) for k, v in m.items()} | {
            "far_over_0.3pct_share": round(float(np.mean(np.asarray(m["far"]) > 0.003)), 3)}
    res: dict[str, Any] = {
        "bundle": bundle.manifest.version, "data": str(args.data), "split": args.split, "frames": len(samples),
        "draws": args.draws, "target_far": args.target_far, "all_frames_at_shipped_conf": full,
        "by_val_frames": sizes,
    }
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", default=str(ROOT / "models" / "default"))
    p.add_argument("--data", default=str(ROOT / "data" / "synth" / "dataset"))
    p.add_argument("--split", default="val")
    p.add_argument("--val-frames", type=int, nargs="+", default=[100, 190, 300, 400],
                   help="validation split sizes (a retraining job's: 40 reviewed + 150 replay = 190)")
    p.add_argument("--target-far", type=float, default=0.002)
    p.add_argument("--draws", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    emit_json(run(args), Path(args.json) if args.json else None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
