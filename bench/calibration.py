"""INT8 MinMax calibration: ONNX Runtime's calibrator against ``models.calibration``, side by side.

Both quantize the shipped bundle's FP32 model (``models/default``) on the same frames, in one run,
alternating (``--repeats`` each): ONNX Runtime's ``MinMaxCalibrater`` (a ReduceMin and a ReduceMax
per float tensor in the graph, one frame per run as the project calibrated before 2026-11-24) and
:func:`models.calibration.minmax_ranges` (the same tensors as plain outputs, 8 frames per run, min
and max in NumPy threads). Reports each one's seconds, the ratio, and the largest relative
difference of the two INT8 models' QDQ scales (the ranges must be the same).

    python bench/calibration.py --images 48 --json out/bench/calibration.json
"""

from __future__ import annotations

import argparse
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
from tqdm import tqdm  # noqa: E402

import models.calibration as calibration  # noqa: E402
import models.quantize as quantize  # noqa: E402
from models.bundle import load_bundle  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _scales(path: Path) -> dict[str, np.ndarray]:
    import onnx
    from onnx import numpy_helper

    return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer
            if i.name.endswith("_scale")}


def _quantize(fp32: Path, out: Path, data: Path, n: int, ours: bool) -> float:
    min_cpus, batch = calibration.MIN_CPUS, quantize.CALIBRATION_BATCH
    # either one on any host: ours from 1 core on; ONNX Runtime's never (one frame per run, as before)
    calibration.MIN_CPUS = 1 if ours else 1 << 30
    quantize.CALIBRATION_BATCH = batch if ours else 1
    try:
        t0 = time.perf_counter()
        quantize.quantize_int8(fp32, out, data, n_images=n)
        return time.perf_counter() - t0
    finally:
        calibration.MIN_CPUS, quantize.CALIBRATION_BATCH = min_cpus, batch


def run(args: argparse.Namespace) -> dict[str, Any]:
    fp32 = load_bundle(ROOT / "models" / "default", roles=("onnx_fp32",)).path("onnx_fp32")
    data = Path(args.data)
    if not quantize.list_dataset_images(data):
        raise SystemExit(f"no images under {data}/images/train: run `make golden` (or pass --data)")
    times: dict[str, list[float]] = {"onnxruntime": [], "threaded": []}
    with tempfile.TemporaryDirectory(prefix="lg_bench_calib_") as tmp:
        for _ in tqdm(range(args.repeats), desc="calibration", unit="round"):
            for name in times:
                times[name].append(_quantize(fp32, Path(tmp) / f"{name}.onnx", data, args.images,
                                             ours=name == "threaded"))
        a, b = _scales(Path(tmp) / "onnxruntime.onnx"), _scales(Path(tmp) / "threaded.onnx")
        if a.keys() != b.keys():
            raise SystemExit("the two INT8 models have different QDQ tensors")
        rel = max(float(np.max(np.abs(b[k] - a[k]) / np.maximum(np.abs(a[k]), 1e-12))) for k in a)
    best = {k: round(min(v), 2) for k, v in times.items()}
    return {
        "images": args.images, "repeats": args.repeats,
        "seconds": {k: [round(x, 2) for x in v] for k, v in times.items()},
        "best_s": best, "ratio_onnxruntime_over_threaded": round(best["onnxruntime"] / best["threaded"], 2),
        "max_rel_scale_difference": rel, "scales": len(a),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT / "data" / "synth" / "dataset"), help="YOLO dataset (train images)")
    p.add_argument("--images", type=int, default=48)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    emit_json(run(args), Path(args.json) if args.json else None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
