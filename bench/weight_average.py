"""Weight averaging after a retraining job: how much forgetting does mixing back the start take away?

Reads a finished ``bench/learning_cycle.py`` run (its ``--work`` and ``--line``), and for each
start weight ``a`` in ``--weights`` writes ``(1 - a) * tuned + a * production``
(:func:`models.weight_average.average_checkpoints`), releases it as the job would (INT8, operating
threshold on the job's validation split; no split parts), runs the job's gate on it (golden set against production,
the reviewed validation data) and scores it on the line's held-out test frames. ``a = 0`` is the
job's own candidate, released again (the control).

    python bench/weight_average.py --work /tmp/runs/por --line porosity --weights 0 0.25 0.5 --json out.json
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

from _common import cpu_model, emit_json  # noqa: E402
from learning_cycle import field_scores  # noqa: E402
from tqdm import tqdm  # noqa: E402

from hub.gate import GateRule  # noqa: E402
from hub.retrain_gate import JobGate  # noqa: E402
from hub.retrain_state import RetrainSettings  # noqa: E402
from models.bundle import load_bundle  # noqa: E402
from models.dataset_io import load_dataset  # noqa: E402
from models.release import release_bundle  # noqa: E402
from models.weight_average import average_checkpoints  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def run(args: argparse.Namespace) -> dict[str, Any]:
    base = Path(args.work).resolve() / args.line
    jobs = sorted((base / "jobs").iterdir())
    job = next(j for j in jobs if (j / "train.json").is_file())
    snap = json.loads((job / "snapshot.json").read_text())
    production = Path(snap["production_bundle"])
    tuned = Path(json.loads((job / "train.json").read_text())["checkpoint"])
    start = load_bundle(production, roles=("checkpoint",)).path("checkpoint")
    field = load_dataset(base.parent / f"field_{args.line}", splits=["train", "test"])
    out_dir = base / "weight_average"
    settings = RetrainSettings(golden=Path(args.golden).resolve(), bundles_dir=base / "bundles", signing_key=None,
                               rule=GateRule(max_recall_drop=args.max_recall_drop / 100))
    imgsz = (int(snap["input_size"][0]), int(snap["input_size"][1]))
    rows: list[dict[str, Any]] = []
    for a in tqdm(args.weights, desc="start weights", unit="model"):
        tag = f"a{a:g}"
        t0 = time.perf_counter()
        ckpt = average_checkpoints(start, tuned, a, out_dir / f"{tag}.pt")
        bundle_dir = out_dir / tag / "bundle"
        work = out_dir / tag / "job"
        work.mkdir(parents=True, exist_ok=True)
        if not (work / "reviewed").exists():
            (work / "reviewed").symlink_to(job / "reviewed")
        gate = JobGate(work, settings, production, f"wa-{tag}")
        try:
            manifest = release_bundle(ckpt, job / "train_data", bundle_dir, version=f"9.{int(a * 100)}.0",
                                      parent_version=snap["production_version"], imgsz=imgsz, overwrite=True,
                                      progress=False, calib_images=settings.calib_images, pool=gate.pool())
            result = gate.run(bundle_dir)
        finally:
            gate.close()
        report = json.loads((work / "gate" / "gate.json").read_text())
        g_c, g_p = report["golden"]["candidate"], report["golden"]["production"]
        after = field_scores(load_bundle(bundle_dir, roles=("onnx_int8",)), field)
        row: dict[str, Any] = {
            "start_weight": a, "seconds": round(time.perf_counter() - t0, 1),
            "gate_passed": result.passed, "gate_reasons": result.reasons,
            "golden_map50_change_points": round(100 * (g_c["map50"] - g_p["map50"]), 2),
            "golden_recall": g_c["recall_at_operating"], "golden_recall_production": g_p["recall_at_operating"],
            "new_data_map50": {k: v["map50"] for k, v in (report["new_data"] or {}).items()},
            "operating_conf": manifest.postprocessing.get("operating_conf"),
            "field_recall": after["recall_at_operating"], "field_part_level": after["part_level"],
            "field_map50": after["map50"],
        }
        rows.append(row)
        print(json.dumps({k: row[k] for k in ("start_weight", "gate_passed", "golden_map50_change_points",
                                                "field_recall", "field_part_level")}), flush=True)
    return {"line": args.line, "job": job.name, "production": snap["production_version"], "rows": rows,
            "machine": {"platform": platform.platform(), "cpu": cpu_model(), "cpus": os.cpu_count()},
            "date": datetime.now(UTC).isoformat(timespec="seconds")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, help="the learning_cycle run's --work")
    p.add_argument("--line", required=True, choices=["porosity", "cover"])
    p.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.25, 0.5])
    p.add_argument("--golden", default=str(ROOT / "data" / "synth" / "dataset"))
    p.add_argument("--max-recall-drop", type=float, default=1.0, help="gate rule, points")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    emit_json(run(args), Path(args.json) if args.json else None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
