"""Draw detections on a frame for the annotated replay video."""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from models.detections import Detections

__all__ = ["draw_detections"]

# BGR colours by class index; cycles for lines with more classes.
_PALETTE = [(0, 215, 255), (60, 60, 255), (255, 160, 0), (200, 80, 220), (80, 220, 80), (255, 255, 255)]


def draw_detections(image: np.ndarray, dets: Detections, classes: Sequence[str], header: str = "") -> np.ndarray:
    """Return a copy of ``image`` with boxes, labels and an optional header line drawn on it."""
    out = image.copy()
    scale = max(out.shape[1] / 1280, 0.5)
    thick = max(int(round(2 * scale)), 1)
    for box, score, cid in zip(dets.boxes, dets.scores, dets.class_ids, strict=True):
        colour = _PALETTE[int(cid) % len(_PALETTE)]
        x1, y1, x2, y2 = (int(round(v)) for v in box)
        cv2.rectangle(out, (x1, y1), (x2, y2), colour, thick)
        label = f"{classes[int(cid)]} {score:.2f}"
        (tw, th), _ = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, 0.5 * scale, thick)
        ty = max(y1 - 4, th + 4)
        cv2.rectangle(out, (x1, ty - th - 4), (x1 + tw + 4, ty + 2), colour, -1)
        cv2.putText(out, label, (x1 + 2, ty - 2), cv2.FONT_HERSHEY_SIMPLEX, 0.5 * scale, (0, 0, 0), thick)
    if header:
        cv2.putText(out, header, (10, int(30 * scale)), cv2.FONT_HERSHEY_SIMPLEX, 0.7 * scale, (255, 255, 255),
                    thick + 1, cv2.LINE_AA)
    return out
