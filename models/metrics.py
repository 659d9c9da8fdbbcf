"""Detection metrics in numpy: an independent port of Ultralytics' mAP computation, plus part-level
metrics for the line (did a defective part get flagged, did a good part raise a false alarm).

The box metrics follow Ultralytics 8.4 (``DetectionValidator.match_predictions`` without scipy,
``ap_per_class`` and ``compute_ap`` with 101-point interpolation) so numbers are comparable with
``yolo val``. Imports numpy only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from models.detections import Detections

if TYPE_CHECKING:  # only for annotations; keeps this module numpy-only
    from models.dataset_io import Part

__all__ = [
    "IOU_THRESHOLDS",
    "ApResult",
    "DetectionMetrics",
    "ap_per_class",
    "box_iou",
    "choose_operating_threshold",
    "compute_ap",
    "match_predictions",
    "part_level",
    "part_scores",
    "smooth",
    "threshold_for_good_scores",
]

#: IoU thresholds 0.50:0.05:0.95, float32 like the torch tensor Ultralytics compares against.
IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10).astype(np.float32)

_AP_GRID = np.linspace(0, 1, 101)  # COCO 101-point recall grid
_trapezoid = getattr(np, "trapezoid", None) or np.trapz  # type: ignore[attr-defined]  # numpy < 2


def box_iou(box1: np.ndarray, box2: np.ndarray, eps: float = 1e-7) -> np.ndarray:
    """Pairwise IoU ``(N, M)`` of ``xyxy`` boxes, computed in float32 like Ultralytics' ``box_iou``."""
    a = np.asarray(box1, dtype=np.float32).reshape(-1, 4)
    b = np.asarray(box2, dtype=np.float32).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / (area_a[:, None] + area_b[None, :] - inter + np.float32(eps))


def match_predictions(
    pred_classes: np.ndarray,
    true_classes: np.ndarray,
    iou: np.ndarray,
    iou_thresholds: np.ndarray = IOU_THRESHOLDS,
) -> np.ndarray:
    """Which predictions are true positives at each IoU threshold: ``(N_pred, T)`` bool.

    ``iou`` is ``(N_true, N_pred)``; predictions must be ordered by descending confidence. Greedy:
    each prediction in turn claims, per threshold, the not-yet-claimed target of its class with the
    highest IoU, and is correct when that IoU reaches the threshold.
    """
    pred_classes = np.asarray(pred_classes).reshape(-1)
    true_classes = np.asarray(true_classes).reshape(-1)
    thresholds = np.asarray(iou_thresholds)
    n_t = len(thresholds)
    correct = np.zeros((len(pred_classes), n_t), dtype=bool)
    if len(pred_classes) == 0 or len(true_classes) == 0:
        return correct
    iou = np.asarray(iou) * (true_classes[:, None] == pred_classes[None, :])
    cols = np.arange(n_t)
    claimed = np.zeros((iou.shape[0], n_t), dtype=bool)
    for j in np.flatnonzero((iou >= thresholds.min()).any(axis=0)):
        avail = np.where(claimed, 0, iou[:, j, None])  # (N_true, T)
        best = avail.argmax(axis=0)
        hit = avail[best, cols] >= thresholds
        correct[j] = hit
        claimed[best, cols] |= hit
    return correct


def smooth(y: np.ndarray, f: float = 0.05) -> np.ndarray:
    """Box-filter smoothing with an odd window of about ``2 * f * len(y)`` samples, edge-padded."""
    nf = round(len(y) * f * 2) // 2 + 1
    pad = np.ones(nf // 2)
    padded = np.concatenate((pad * y[0], y, pad * y[-1]))
    return np.convolve(padded, np.ones(nf) / nf, mode="valid")


def compute_ap(recall: np.ndarray, precision: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """AP of one precision/recall curve by 101-point interpolation; also the envelope and padded recall."""
    recall = np.asarray(recall, dtype=np.float64)
    precision = np.asarray(precision, dtype=np.float64)
    mrec = np.concatenate(([0.0], recall, [recall[-1] if len(recall) else 1.0], [1.0]))
    mpre = np.concatenate(([1.0], precision, [0.0], [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # monotone (non-increasing) precision envelope
    ap = float(_trapezoid(np.interp(_AP_GRID, mrec, mpre), _AP_GRID))
    return ap, mpre, mrec


class ApResult(NamedTuple):
    """Output of :func:`ap_per_class`, in Ultralytics' order; arrays are per class with targets."""

    tp: np.ndarray  # (nc,) TP count at the max-mean-F1 confidence
    fp: np.ndarray  # (nc,)
    p: np.ndarray  # (nc,) precision at that confidence
    r: np.ndarray  # (nc,) recall at that confidence
    f1: np.ndarray  # (nc,)
    ap: np.ndarray  # (nc, T) AP per IoU threshold
    unique_classes: np.ndarray  # (nc,) class ids the rows refer to
    p_curve: np.ndarray  # (nc, 1000) precision vs confidence
    r_curve: np.ndarray  # (nc, 1000)
    f1_curve: np.ndarray  # (nc, 1000)
    x: np.ndarray  # (1000,) confidence grid
    prec_values: np.ndarray  # (nc, 1000) precision vs recall at IoU 0.5


def ap_per_class(
    tp: np.ndarray, conf: np.ndarray, pred_cls: np.ndarray, target_cls: np.ndarray, eps: float = 1e-16
) -> ApResult:
    """Per-class AP at each IoU threshold and P/R/F1 at the confidence that maximises mean F1.

    ``tp`` is ``(N_pred, T)`` from :func:`match_predictions` over the whole split, ``conf`` and
    ``pred_cls`` are ``(N_pred,)``, ``target_cls`` lists the class of every ground-truth box.
    Only classes that occur in ``target_cls`` get a row.
    """
    tp = np.asarray(tp)
    conf = np.asarray(conf).reshape(-1)
    pred_cls = np.asarray(pred_cls).reshape(-1)
    target_cls = np.asarray(target_cls).reshape(-1)
    order = np.argsort(-conf)
    tp, conf, pred_cls = tp[order], conf[order], pred_cls[order]

    classes, n_targets = np.unique(target_cls, return_counts=True)
    nc = len(classes)
    x = np.linspace(0, 1, 1000)
    n_iou = tp.shape[1] if tp.ndim == 2 else len(IOU_THRESHOLDS)
    ap = np.zeros((nc, n_iou))
    p_curve, r_curve = np.zeros((nc, 1000)), np.zeros((nc, 1000))
    prec_rows = []
    for ci, c in enumerate(classes):
        sel = pred_cls == c
        n_l, n_p = n_targets[ci], int(sel.sum())
        if n_p == 0 or n_l == 0:
            prec_rows.append(np.zeros_like(x))
            continue
        tps = tp[sel].cumsum(axis=0)
        fps = (1 - tp[sel]).cumsum(axis=0)
        recall = tps / (n_l + eps)
        precision = tps / (tps + fps)
        # confidences decrease along the curve, so interpolate on negated axes
        r_curve[ci] = np.interp(-x, -conf[sel], recall[:, 0], left=0)
        p_curve[ci] = np.interp(-x, -conf[sel], precision[:, 0], left=1)
        for t in range(n_iou):
            ap[ci, t], mpre, mrec = compute_ap(recall[:, t], precision[:, t])
            if t == 0:
                prec_rows.append(np.interp(x, mrec, mpre))
    prec_values = np.array(prec_rows) if prec_rows else np.zeros((1, 1000))

    f1_curve = 2 * p_curve * r_curve / (p_curve + r_curve + eps)
    best = smooth(f1_curve.mean(axis=0), 0.1).argmax() if nc else 0
    p, r, f1 = p_curve[:, best], r_curve[:, best], f1_curve[:, best]
    tp_at = (r * n_targets).round()
    fp_at = (tp_at / (p + eps) - tp_at).round()
    return ApResult(
        tp_at, fp_at, p, r, f1, ap, classes.astype(int), p_curve, r_curve, f1_curve, x, prec_values
    )


@dataclass
class DetectionMetrics:
    """Accumulates per-image matches over a split; :meth:`compute` returns the split's AP results."""

    nc: int

    def __post_init__(self) -> None:
        self._tp: list[np.ndarray] = []
        self._conf: list[np.ndarray] = []
        self._pred_cls: list[np.ndarray] = []
        self._target_cls: list[np.ndarray] = []

    def update(self, det: Detections, labels: np.ndarray) -> np.ndarray:
        """Add one image: ``det`` in original pixels, ``labels`` ``(M, 5)`` ``[cls, x1, y1, x2, y2]``.

        Returns the image's ``(N, T)`` true-positive matrix.
        """
        labels = np.asarray(labels, dtype=np.float32).reshape(-1, 5)
        order = np.argsort(-det.scores, kind="stable")
        det = det[order]
        if len(det) and len(labels):
            tp = match_predictions(det.class_ids, labels[:, 0], box_iou(labels[:, 1:], det.boxes))
        else:
            tp = np.zeros((len(det), len(IOU_THRESHOLDS)), dtype=bool)
        self._tp.append(tp)
        self._conf.append(det.scores)
        self._pred_cls.append(det.class_ids.astype(np.float64))
        self._target_cls.append(labels[:, 0].astype(np.float64))
        return tp

    @property
    def n_instances(self) -> np.ndarray:
        target = np.concatenate(self._target_cls) if self._target_cls else np.zeros(0)
        return np.bincount(target.astype(int), minlength=self.nc)

    def compute(self) -> ApResult:
        n_iou = len(IOU_THRESHOLDS)
        tp = np.concatenate(self._tp) if self._tp else np.zeros((0, n_iou), bool)
        conf = np.concatenate(self._conf) if self._conf else np.zeros(0)
        pred_cls = np.concatenate(self._pred_cls) if self._pred_cls else np.zeros(0)
        target_cls = np.concatenate(self._target_cls) if self._target_cls else np.zeros(0)
        return ap_per_class(tp, conf, pred_cls, target_cls)


# ------------------------------------------------------------------------------------------
# Part-level metrics
# ------------------------------------------------------------------------------------------

MIN_VISIBLE = 0.5


def _part_max_scores(parts: Sequence[Part], det: Detections) -> np.ndarray:
    """For each part, the highest detection score whose box centre lies inside it (-inf if none)."""
    out = np.full(len(parts), -np.inf)
    if not len(parts) or not len(det):
        return out
    boxes = np.asarray([p.box for p in parts], dtype=np.float64)  # (P, 4)
    c = (det.boxes[:, :2].astype(np.float64) + det.boxes[:, 2:].astype(np.float64)) / 2  # (D, 2)
    inside = (
        (c[None, :, 0] >= boxes[:, None, 0])
        & (c[None, :, 0] <= boxes[:, None, 2])
        & (c[None, :, 1] >= boxes[:, None, 1])
        & (c[None, :, 1] <= boxes[:, None, 3])
    )  # (P, D)
    scores = np.where(inside, det.scores.astype(np.float64)[None, :], -np.inf)
    return scores.max(axis=1)


def _collect(
    parts: Sequence[Sequence[Part] | None], detections: Sequence[Detections], min_visible: float
) -> tuple[np.ndarray, np.ndarray]:
    """Max in-part detection score for every counted defective part and every counted good part."""
    if len(parts) != len(detections):
        raise ValueError(f"{len(parts)} images of parts but {len(detections)} of detections")
    bad: list[float] = []
    good: list[float] = []
    for img_parts, det in zip(parts, detections, strict=True):
        if not img_parts:
            continue
        counted = [p for p in img_parts if p.visible >= min_visible]
        scores = _part_max_scores(counted, det)
        for p, s in zip(counted, scores, strict=True):
            (bad if p.defective else good).append(s)
    return np.asarray(bad, dtype=np.float64), np.asarray(good, dtype=np.float64)


def part_scores(
    parts: Sequence[Sequence[Part] | None], detections: Sequence[Detections], min_visible: float = MIN_VISIBLE
) -> tuple[np.ndarray, np.ndarray]:
    """``(defective, good)``: each counted part's highest in-part detection score (``-inf``: none)."""
    return _collect(parts, detections, min_visible)


def part_level(
    parts: Sequence[Sequence[Part] | None],
    detections: Sequence[Detections],
    conf: float,
    min_visible: float = MIN_VISIBLE,
) -> dict[str, float | int]:
    """Part-level recall and false-alarm rate at confidence ``conf`` (per image: parts and detections).

    A defective part is caught when a detection with ``score >= conf`` has its centre inside the
    part's box; a good part with such a detection is a false alarm. Parts with ``visible < 0.5`` and
    images without a parts sidecar (``None``) are ignored. Rates are 0.0 when there is nothing to count.
    """
    bad, good = _collect(parts, detections, min_visible)
    caught = int((bad >= conf).sum())
    false_alarms = int((good >= conf).sum())
    return {
        "conf": float(conf),
        "recall": caught / len(bad) if len(bad) else 0.0,
        "false_alarm_rate": false_alarms / len(good) if len(good) else 0.0,
        "n_defective": len(bad),
        "n_good": len(good),
        "caught": caught,
        "false_alarms": false_alarms,
    }


def choose_operating_threshold(
    parts: Sequence[Sequence[Part] | None],
    detections: Sequence[Detections],
    target_far: float = 0.003,
    min_conf: float = 0.001,
    min_visible: float = MIN_VISIBLE,
) -> float:
    """The lowest confidence threshold whose good-part false-alarm rate is ``<= target_far``.

    Meant for a validation split (detections made at a low conf, e.g. 0.001); report the result on
    test with :func:`part_level`. Never returns less than ``min_conf``. The value may sit one float32
    step above a detection score, so that ``score >= threshold`` excludes exactly that score.
    """
    _, good = _collect(parts, detections, min_visible)
    return threshold_for_good_scores(good, target_far, min_conf)


def threshold_for_good_scores(good: np.ndarray, target_far: float = 0.003, min_conf: float = 0.001) -> float:
    """:func:`choose_operating_threshold` from the good parts' scores (:func:`part_scores`)."""
    if not 0 <= target_far <= 1:
        raise ValueError(f"target_far must be in [0, 1], got {target_far}")
    if len(good) == 0:
        return float(min_conf)
    allowed = int(np.floor(target_far * len(good) + 1e-9))  # false alarms we may keep
    hits = np.sort(good[np.isfinite(good)])[::-1]
    if allowed >= len(hits):
        return float(min_conf)
    # must exclude the (allowed+1)-th highest score: threshold just above it
    above = float(np.nextafter(np.float32(hits[allowed]), np.float32(np.inf)))
    return max(above, float(min_conf))
