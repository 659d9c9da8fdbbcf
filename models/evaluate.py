"""Evaluate a detector on a dataset split: box mAP (Ultralytics-compatible) and part-level metrics.

``predict`` is any ``Callable[[list[np.ndarray]], list[Detections]]`` over BGR frames, with boxes in
original-frame pixels. If it accepts ``conf``/``iou`` keywords (as :class:`OnnxPredictor` does) they
are passed through; otherwise its detections are only filtered at ``conf`` here. No torch needed.
"""

from __future__ import annotations

import inspect
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from models.dataset_io import Sample, YoloDataset
from models.detections import Detections
from models.metrics import DetectionMetrics, part_level
from models.onnx_predict import OnnxPredictor

__all__ = ["EvalReport", "OnnxPredictor", "evaluate", "evaluate_predictions", "predict_split"]

Predict = Callable[[list[np.ndarray]], list[Detections]]

DEFAULT_OPERATING_CONF = 0.25


@dataclass
class EvalReport:
    """Results of one split. Per-class metrics are ``None`` for classes without ground truth."""

    split: str
    map50: float
    map50_95: float
    precision: float
    recall: float
    per_class: dict[str, dict[str, Any]]
    part_level: dict[str, Any]
    n_images: int
    n_instances: int
    seconds: float = 0.0
    conf: float | None = None  # NMS settings of the mAP pass, when known
    iou: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(asdict(self))


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, (np.floating, float)):
        v = float(x)
        return v if np.isfinite(v) else None
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def _accepts(fn: Callable[..., Any], *names: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return True
    return all(n in params for n in names)


def _progress(items: Iterable[Any], total: int, enabled: bool, desc: str) -> Iterable[Any]:
    if not enabled:
        return items
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a declared dependency
        return items
    return tqdm(items, total=total, desc=desc, unit="batch", file=sys.stderr)


def predict_split(
    predict: Predict,
    samples: Sequence[Sample],
    conf: float = 0.001,
    iou: float = 0.7,
    batch: int = 8,
    progress: bool = False,
) -> list[Detections]:
    """Run ``predict`` over ``samples`` in batches; one :class:`Detections` per sample (score >= conf)."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    kwargs = {"conf": conf, "iou": iou} if _accepts(predict, "conf", "iou") else {}
    starts = range(0, len(samples), batch)
    out: list[Detections] = []
    for s in _progress(starts, len(starts), progress, "evaluate"):
        chunk = samples[s : s + batch]
        frames = [smp.read() for smp in chunk]
        dets = predict(frames, **kwargs)
        if len(dets) != len(frames):
            raise ValueError(f"predict returned {len(dets)} results for {len(frames)} frames")
        out.extend(d.filter(conf) for d in dets)
    return out


def evaluate_predictions(
    dataset: YoloDataset,
    split: str,
    detections: Sequence[Detections],
    operating_conf: float | None = None,
) -> EvalReport:
    """Metrics of already computed per-image ``detections`` for ``dataset.split(split)``."""
    samples = dataset.split(split)
    if len(samples) != len(detections):
        raise ValueError(f"{len(samples)} samples in {split!r} but {len(detections)} detections")
    nc = dataset.nc
    dm = DetectionMetrics(nc)
    for smp, det in zip(samples, detections, strict=True):
        if len(det) and (det.class_ids.min() < 0 or det.class_ids.max() >= nc):
            raise ValueError(f"{smp.image_path}: predicted class id outside 0..{nc - 1}")
        dm.update(det, smp.labels)
    res = dm.compute()
    n_inst = dm.n_instances

    per_class: dict[str, dict[str, Any]] = {}
    row_of = {int(c): i for i, c in enumerate(res.unique_classes)}
    for cid, name in enumerate(dataset.names):
        i = row_of.get(cid)
        if i is None:
            per_class[name] = {
                "precision": None, "recall": None, "ap50": None, "ap50_95": None, "n_instances": 0,
            }  # fmt: skip
        else:
            per_class[name] = {
                "precision": float(res.p[i]),
                "recall": float(res.r[i]),
                "ap50": float(res.ap[i, 0]),
                "ap50_95": float(res.ap[i].mean()),
                "n_instances": int(n_inst[cid]),
            }
    has_rows = len(res.ap) > 0
    op = DEFAULT_OPERATING_CONF if operating_conf is None else operating_conf
    return EvalReport(
        split=split,
        map50=float(res.ap[:, 0].mean()) if has_rows else 0.0,
        map50_95=float(res.ap.mean()) if has_rows else 0.0,
        precision=float(res.p.mean()) if has_rows else 0.0,
        recall=float(res.r.mean()) if has_rows else 0.0,
        per_class=per_class,
        part_level=part_level([s.parts for s in samples], detections, op),
        n_images=len(samples),
        n_instances=int(n_inst.sum()),
    )


def evaluate(
    predict: Predict,
    dataset: YoloDataset,
    split: str = "test",
    conf: float = 0.001,
    iou: float = 0.7,
    batch: int = 8,
    operating_conf: float | None = None,
    progress: bool = True,
) -> EvalReport:
    """Predict every image of ``split`` and compute box mAP and part-level metrics.

    ``conf``/``iou`` are the NMS settings for the mAP pass (0.001/0.7 as ``yolo val``); part-level
    metrics are taken at ``operating_conf`` (0.25 when None) from the same detections.
    """
    samples = dataset.split(split)
    t0 = time.perf_counter()
    dets = predict_split(predict, samples, conf=conf, iou=iou, batch=batch, progress=progress)
    report = evaluate_predictions(dataset, split, dets, operating_conf=operating_conf)
    report.seconds = time.perf_counter() - t0
    report.conf, report.iou = float(conf), float(iou)
    return report
