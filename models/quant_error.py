"""How far an INT8 model's output is from its FP32 model's (onnxruntime only, no torch):
:func:`sensitivity` on a few frames (the bundle's ``quantization.deltas``), and
:func:`compare_calibration_methods` to choose :data:`models.quantize.DEFAULT_CALIBRATION_METHOD`."""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from models.processing import preprocess_batch
from models.quantize import CALIBRATION_METHODS, QuantizationError, quantize_int8

__all__ = ["compare_calibration_methods", "sensitivity"]

log = logging.getLogger(__name__)


def _session(path: str | Path, threads: int = 2):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    den = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / den) if den > 0 else float(np.array_equal(a, b))


def sensitivity(
    fp32_path: str | Path,
    int8_path: str | Path,
    frames: Sequence[np.ndarray],
    nc: int | None = None,
    top_k: int = 100,
) -> dict[str, float]:
    """How far the INT8 model's raw output is from FP32's on ``frames`` (BGR uint8 images).

    Output layout is Ultralytics' ``(B, 4 + nc, anchors)``: rows 0-3 box ``xywh`` in input
    pixels, then per-class scores. Reports max/mean abs error and cosine similarity of the
    whole output, the box rows and the class rows, the error on the ``top_k`` highest-scoring
    anchors of the FP32 model (the ones that would become detections), and top-1 class
    agreement on those anchors.
    """
    s32, s8 = _session(fp32_path), _session(int8_path)
    inp = s32.get_inputs()[0]
    h, w = inp.shape[2], inp.shape[3]
    if not (isinstance(h, int) and isinstance(w, int)):
        h = w = 640
    ys32, ys8 = [], []
    for f in frames:
        x, _ = preprocess_batch([f], (h, w))
        ys32.append(s32.run(None, {inp.name: x})[0])
        ys8.append(s8.run(None, {s8.get_inputs()[0].name: x})[0])
    a, b = np.concatenate(ys32), np.concatenate(ys8)
    if a.shape != b.shape:
        raise QuantizationError(f"output shapes differ: fp32 {a.shape} vs int8 {b.shape}")
    nc = nc if nc is not None else a.shape[1] - 4
    box_a, box_b = a[:, :4], b[:, :4]
    cls_a, cls_b = a[:, 4 : 4 + nc], b[:, 4 : 4 + nc]
    best = cls_a.max(axis=1)  # (B, anchors)
    k = min(top_k, best.shape[1])
    top = np.argsort(-best, axis=1)[:, :k]
    take = np.take_along_axis
    top_cls_a = take(cls_a, top[:, None, :], axis=2)
    top_cls_b = take(cls_b, top[:, None, :], axis=2)
    top_box_a = take(box_a, top[:, None, :], axis=2)
    top_box_b = take(box_b, top[:, None, :], axis=2)
    return {
        "frames": len(frames),
        "output_max_abs": float(np.abs(a - b).max()),
        "output_cosine": _cos(a, b),
        "box_max_abs_px": float(np.abs(box_a - box_b).max()),
        "box_mean_abs_px": float(np.abs(box_a - box_b).mean()),
        "box_cosine": _cos(box_a, box_b),
        "cls_max_abs": float(np.abs(cls_a - cls_b).max()),
        "cls_mean_abs": float(np.abs(cls_a - cls_b).mean()),
        "cls_cosine": _cos(cls_a, cls_b),
        "topk": k,
        "topk_cls_max_abs": float(np.abs(top_cls_a - top_cls_b).max()),
        "topk_box_mean_abs_px": float(np.abs(top_box_a - top_box_b).mean()),
        "topk_argmax_agree": float((top_cls_a.argmax(1) == top_cls_b.argmax(1)).mean()),
    }


def compare_calibration_methods(
    fp32_path: str | Path,
    calib_source: str | Path,
    eval_frames: Sequence[np.ndarray],
    *,
    methods: Sequence[str] = CALIBRATION_METHODS,
    n_images: int = 32,
    work_dir: str | Path | None = None,
    **quant_kwargs: Any,
) -> dict[str, dict[str, Any]]:
    """Quantize with each calibration method and report :func:`sensitivity` of each.

    Results depend heavily on the weights: run it on the trained checkpoint before changing
    :data:`models.quantize.DEFAULT_CALIBRATION_METHOD`.
    """
    out: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="lg_calcmp_", dir=work_dir) as tmp:
        for m in methods:
            int8 = Path(tmp) / f"{m}.onnx"
            rep = quantize_int8(
                fp32_path, int8, calib_source, n_images=n_images, calibration_method=m, **quant_kwargs
            )
            out[m] = {"seconds": rep.seconds, **sensitivity(fp32_path, int8, eval_frames)}
            log.info("calibration %s: %s", m, json.dumps(out[m]))
    return out
