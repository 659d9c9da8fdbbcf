"""MinMax calibration ranges for static INT8, reduced in threads instead of in the graph.

ONNX Runtime's ``MinMaxCalibrater`` appends a ReduceMin and a ReduceMax node to every float tensor
and runs that graph unoptimised; those reductions run one thread each. On YOLOv8n at 544x960 the
augmented graph took 4x the plain graph's time (16 frames on 2 cores: 10.6 s against 2.7 s), and a
16-core host calibrated no faster than 2 cores (whole model 17 s, the split hub part 17 s).

:func:`minmax_ranges` exposes the same tensors (ONNX Runtime's own selection,
``select_tensors_to_calibrate``) as plain graph outputs, runs the calibration batches and takes each
tensor's min and max with NumPy in a thread pool (NumPy releases the GIL). The result is the
``TensorsData`` ``MinMaxCalibrater`` computes (global min and max, not symmetric, no moving average),
written as a calibration cache that ``quantize_static`` reads instead of calibrating.

It pays on many cores only (``bench/calibration.py``, side by side, the shipped model): on the
16-core H100 host 1.28x (100 frames) and 1.44x (200 frames) ONNX Runtime's speed, on the 2-core
build machine 0.59x (48 frames: copying every activation out costs more than two cores win).
:func:`use_threaded_minmax` says which to use: from :data:`MIN_CPUS` cores on (a threshold set
between those two measured points, not measured in between).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

__all__ = ["MIN_CPUS", "minmax_ranges", "use_threaded_minmax"]

#: cores from which :func:`minmax_ranges` replaces ONNX Runtime's calibrator
MIN_CPUS = 8


def use_threaded_minmax(cpus: int | None = None) -> bool:
    """True on a host with :data:`MIN_CPUS` cores or more (default: this one's)."""
    n = (os.cpu_count() or 1) if cpus is None else cpus
    return n >= MIN_CPUS


def minmax_ranges(model: Path, batches: Iterable[dict[str, np.ndarray]], cache: Path, *,
                  op_types: Sequence[str] | None = None, threads: int | None = None) -> int:
    """Write the MinMax ranges of ``model``'s calibrated tensors over ``batches`` (feeds of the
    model's inputs) to ``cache`` (ONNX Runtime's calibration cache JSON); returns the number of
    tensors. ``op_types``: only the tensors of these ops (ONNX Runtime's ``op_types_to_calibrate``)."""
    import tempfile

    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization.calibrate import CalibrationMethod, MinMaxCalibrater, TensorsData, save_tensors_data

    with tempfile.TemporaryDirectory(prefix="lg_minmax_") as tmp:
        cal = MinMaxCalibrater(model, op_types_to_calibrate=op_types,
                               augmented_model_path=str(Path(tmp) / "unused.onnx"))
        names, value_infos = cal.select_tensors_to_calibrate(cal.model)
        graph_out = {o.name for o in cal.model.graph.output}
        exposed = sorted(names)
        for name in exposed:
            if name not in graph_out:
                cal.model.graph.output.append(value_infos[name])
        path = Path(tmp) / "exposed.onnx"
        onnx.save(cal.model, str(path))
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # as ONNX Runtime calibrates
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    lo: dict[str, float] = {}
    hi: dict[str, float] = {}
    with ThreadPoolExecutor(threads or min(16, os.cpu_count() or 1), thread_name_prefix="minmax") as pool:
        for feed in batches:
            outs = session.run(exposed, feed)
            for name, (a, b) in zip(exposed, pool.map(_min_max, outs), strict=True):
                lo[name] = min(lo.get(name, a), a)
                hi[name] = max(hi.get(name, b), b)
    if not lo:
        raise ValueError("no calibration data")
    pairs = {n: (np.array([lo[n]], np.float32), np.array([hi[n]], np.float32)) for n in exposed}
    save_tensors_data(TensorsData(CalibrationMethod.MinMax, pairs), str(cache))
    return len(pairs)


def _min_max(a: np.ndarray) -> tuple[float, float]:
    if a.size == 0:
        return 0.0, 0.0
    return float(np.nanmin(a)), float(np.nanmax(a))
