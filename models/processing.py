"""Pre- and post-processing for YOLO-style detectors, in numpy and OpenCV only (no torch).

Letterboxing matches Ultralytics' ``LetterBox(auto=False, center=True)`` so that a model
exported from Ultralytics sees the same pixels here as in its own validator; :func:`postprocess`
matches Ultralytics' ``non_max_suppression`` followed by ``scale_boxes``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from models.detections import Detections

__all__ = [
    "LetterboxInfo",
    "letterbox",
    "nms",
    "postprocess",
    "preprocess_batch",
    "resize_for_input",
    "scale_boxes_to_input",
    "scale_boxes_to_original",
]

PAD_VALUE = 114


@dataclass(frozen=True)
class LetterboxInfo:
    """How an original frame was mapped into the model input: ``x_in = x * scale + pad_x``."""

    scale: float
    pad_x: float
    pad_y: float
    orig_w: int
    orig_h: int


def resize_for_input(img: np.ndarray, new_shape: tuple[int, int], scaleup: bool = True) -> tuple[np.ndarray, float]:
    """``img`` scaled as :func:`letterbox` scales it into ``new_shape`` (h, w), before the padding,
    and the scale: what the model sees of a frame (training crops are cut from this)."""
    h, w = img.shape[:2]
    r = min(new_shape[0] / h, new_shape[1] / w)
    if not scaleup:
        r = min(r, 1.0)
    new_unpad = (int(round(w * r)), int(round(h * r)))
    if (w, h) != new_unpad:
        img = cv2.resize(img, new_unpad, interpolation=cv2.INTER_LINEAR)
    return img, r


def letterbox(
    img: np.ndarray, new_shape: int | tuple[int, int] = 640, scaleup: bool = True
) -> tuple[np.ndarray, LetterboxInfo]:
    """Resize keeping aspect ratio and pad to ``new_shape`` (h, w). BGR uint8 in and out."""
    if isinstance(new_shape, int):
        new_shape = (new_shape, new_shape)
    h, w = img.shape[:2]
    img, r = resize_for_input(img, new_shape, scaleup)
    dw = (new_shape[1] - img.shape[1]) / 2
    dh = (new_shape[0] - img.shape[0]) / 2
    top, bottom = int(round(dh - 0.1)), int(round(dh + 0.1))
    left, right = int(round(dw - 0.1)), int(round(dw + 0.1))
    img = cv2.copyMakeBorder(img, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(PAD_VALUE,) * 3)
    return img, LetterboxInfo(scale=r, pad_x=float(left), pad_y=float(top), orig_w=w, orig_h=h)


def preprocess_batch(
    images: list[np.ndarray], imgsz: int | tuple[int, int] = 640
) -> tuple[np.ndarray, list[LetterboxInfo]]:
    """BGR uint8 frames -> float32 NCHW RGB in [0, 1], plus each frame's letterbox mapping."""
    if isinstance(imgsz, int):
        imgsz = (imgsz, imgsz)
    batch = np.empty((len(images), 3, imgsz[0], imgsz[1]), dtype=np.float32)
    infos = []
    for i, img in enumerate(images):
        boxed, info = letterbox(img, imgsz)
        # BGR HWC uint8 -> RGB CHW float32
        np.multiply(boxed[:, :, ::-1].transpose(2, 0, 1), 1 / 255.0, out=batch[i], casting="unsafe")
        infos.append(info)
    return batch, infos


# --------------------------------------------------------------------------------------------
# Post-processing: decode the raw (B, 4 + nc, A) head output, NMS, undo the letterbox.
# --------------------------------------------------------------------------------------------

#: Per-class coordinate offset that keeps boxes of different classes apart in class-aware NMS.
MAX_WH = 7680
#: Candidates kept (by score) before NMS, as in Ultralytics.
MAX_NMS = 30000


def _gains(info: LetterboxInfo) -> tuple[float, float]:
    """Per-axis scale actually applied by :func:`letterbox` (the resized size is rounded per side)."""
    new_w = max(int(round(info.orig_w * info.scale)), 1)
    new_h = max(int(round(info.orig_h * info.scale)), 1)
    return new_w / info.orig_w, new_h / info.orig_h


def scale_boxes_to_input(boxes: np.ndarray, info: LetterboxInfo) -> np.ndarray:
    """Map ``xyxy`` boxes from the original frame into the letterboxed model input (a new array)."""
    gx, gy = _gains(info)
    out = np.array(boxes, dtype=np.float32, copy=True).reshape(-1, 4)
    out[:, [0, 2]] = out[:, [0, 2]] * gx + info.pad_x
    out[:, [1, 3]] = out[:, [1, 3]] * gy + info.pad_y
    return out


def scale_boxes_to_original(boxes: np.ndarray, info: LetterboxInfo, clip: bool = True) -> np.ndarray:
    """Map ``xyxy`` boxes from the letterboxed model input back to the original frame (a new array).

    Same arithmetic as Ultralytics ``scale_boxes`` with ``ratio_pad=None``: subtract the padding, divide by
    the per-axis gain of the rounded resize, then clip to the frame.
    """
    gx, gy = _gains(info)
    out = np.array(boxes, dtype=np.float32, copy=True).reshape(-1, 4)
    out[:, [0, 2]] = (out[:, [0, 2]] - info.pad_x) / gx
    out[:, [1, 3]] = (out[:, [1, 3]] - info.pad_y) / gy
    if clip:
        out[:, [0, 2]] = out[:, [0, 2]].clip(0, info.orig_w)
        out[:, [1, 3]] = out[:, [1, 3]].clip(0, info.orig_h)
    return out


def nms(boxes: np.ndarray, scores: np.ndarray, iou_thres: float, max_keep: int | None = None) -> np.ndarray:
    """Greedy non-maximum suppression on ``xyxy`` boxes; returns kept indices by descending score.

    A box is suppressed when its IoU with an already kept, higher-scoring box is greater than
    ``iou_thres`` (same rule as torchvision / Ultralytics). ``max_keep`` stops once that many boxes
    are kept, which gives the same result as truncating the full output but is much faster when
    thousands of low-score candidates come in (evaluation at ``conf=0.001``).
    """
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float32).reshape(-1)
    if len(boxes) != len(scores):
        raise ValueError(f"{len(boxes)} boxes but {len(scores)} scores")
    n = len(scores)
    if n == 0:
        return np.zeros((0,), dtype=np.int64)
    order = np.argsort(-scores, kind="stable")
    if max_keep is None or max_keep >= n:
        return _greedy_nms(boxes, order, iou_thres, n)
    # Whether a box is kept depends only on the boxes ranked above it, so NMS over the top-k
    # candidates is exact for them; widen k until enough boxes survive or all are included.
    k = max(4 * max_keep, 256)
    while True:
        keep = _greedy_nms(boxes, order[:k], iou_thres, max_keep)
        if len(keep) >= max_keep or k >= n:
            return keep
        k *= 4


def _greedy_nms(boxes: np.ndarray, order: np.ndarray, iou_thres: float, limit: int) -> np.ndarray:
    """NMS over ``boxes[order]`` (``order`` already sorted by descending score), at most ``limit`` kept."""
    x1, y1, x2, y2 = (np.ascontiguousarray(boxes[order, j]) for j in range(4))
    areas = (x2 - x1) * (y2 - y1)
    keep = np.empty(min(limit, len(order)), dtype=np.int64)
    nk = 0
    while order.size and nk < len(keep):
        keep[nk] = order[0]
        nk += 1
        if order.size == 1:
            break
        xx1 = np.maximum(x1[0], x1[1:])
        yy1 = np.maximum(y1[0], y1[1:])
        xx2 = np.minimum(x2[0], x2[1:])
        yy2 = np.minimum(y2[0], y2[1:])
        inter = np.maximum(xx2 - xx1, 0) * np.maximum(yy2 - yy1, 0)
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = inter / (areas[0] + areas[1:] - inter)
        # NaN (0/0 for degenerate boxes) compares False with '>' so such boxes survive, as in torch
        alive = np.flatnonzero(~(iou > iou_thres)) + 1
        order, x1, y1, x2, y2, areas = order[alive], x1[alive], y1[alive], x2[alive], y2[alive], areas[alive]
    return keep[:nk]


def _decode_one(
    pred: np.ndarray, conf: float, iou: float, max_det: int, agnostic: bool, multi_label: bool, nc: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image's ``(4 + nc, A)`` output -> (xyxy boxes in input pixels, scores, class ids) after NMS."""
    cls_scores = pred[4 : 4 + nc]
    best = cls_scores.max(axis=0)
    cand = np.flatnonzero(best > conf)
    if cand.size == 0:
        return np.zeros((0, 4), np.float32), np.zeros((0,), np.float32), np.zeros((0,), np.int32)
    sc = cls_scores[:, cand]  # (nc, n)
    if multi_label and nc > 1:
        ci, bi = np.nonzero(sc > conf)  # (class, box) pairs
        order = np.lexsort((ci, bi))  # box-major like torch.where on (n, nc)
        ci, bi = ci[order], bi[order]
        scores = sc[ci, bi]
        cls = ci
        cand = cand[bi]
    else:
        cls = sc.argmax(axis=0)
        scores = sc[cls, np.arange(sc.shape[1])]
    if scores.size > MAX_NMS:
        top = np.argsort(-scores, kind="stable")[:MAX_NMS]
        scores, cls, cand = scores[top], cls[top], cand[top]
    xywh = pred[:4, cand].T.astype(np.float32, copy=False)
    boxes = np.empty_like(xywh)
    half_wh = xywh[:, 2:4] / 2
    boxes[:, :2] = xywh[:, :2] - half_wh
    boxes[:, 2:] = xywh[:, :2] + half_wh
    offset = 0.0 if agnostic else MAX_WH
    keep = nms(boxes + (cls[:, None] * offset).astype(np.float32), scores, iou, max_keep=max_det)
    return boxes[keep], scores[keep].astype(np.float32, copy=False), cls[keep].astype(np.int32)


def postprocess(
    raw: np.ndarray,
    infos: Sequence[LetterboxInfo | None],
    conf: float = 0.25,
    iou: float = 0.7,
    max_det: int = 300,
    agnostic: bool = False,
    multi_label: bool = False,
) -> list[Detections]:
    """Decode a YOLOv8-style ``(B, 4 + nc, A)`` output into one :class:`Detections` per frame.

    Semantics follow Ultralytics ``non_max_suppression``: a candidate needs a best-class score strictly
    above ``conf``; each box keeps its best class only (``multi_label=False``, the predictor's default;
    Ultralytics' validator uses ``multi_label=True``); at most 30000 candidates enter class-aware NMS
    (boxes offset by ``class * 7680``); the top ``max_det`` survivors are kept. Boxes are then mapped
    back to each original frame (padding removed, scale undone, clipped); where a frame's info is
    ``None`` they stay in model-input pixels (the split head service: the agent maps them back).
    """
    raw = np.asarray(raw)
    if raw.ndim == 2:
        raw = raw[None]
    if raw.ndim != 3 or raw.shape[1] < 5:
        raise ValueError(f"expected raw output of shape (B, 4 + nc, A), got {raw.shape}")
    if len(infos) != raw.shape[0]:
        raise ValueError(f"{raw.shape[0]} outputs but {len(infos)} letterbox infos")
    if not (0.0 <= conf <= 1.0 and 0.0 <= iou <= 1.0):
        raise ValueError(f"conf and iou must be in [0, 1], got conf={conf}, iou={iou}")
    nc = raw.shape[1] - 4
    out = []
    for pred, info in zip(raw, infos, strict=True):
        boxes, scores, cls = _decode_one(pred, conf, iou, max_det, agnostic, multi_label, nc)
        out.append(Detections(boxes if info is None else scale_boxes_to_original(boxes, info), scores, cls))
    return out
