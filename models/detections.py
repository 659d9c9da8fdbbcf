"""The one result type that flows through LineGuard: :class:`Detections`.

Boxes are ``xyxy`` in the pixel coordinates of the image they refer to (the
original camera frame once post-processing has undone the letterbox).
This module imports numpy only, so the edge agent can use it without torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Detections"]


@dataclass(frozen=True)
class Detections:
    """Detections of one image.

    Attributes:
        boxes: ``(N, 4)`` float32, ``x1, y1, x2, y2`` in pixels.
        scores: ``(N,)`` float32 confidences in ``[0, 1]``.
        class_ids: ``(N,)`` int32 indexes into the model's class names.
        undecided: no result for the frame (always empty).
    """

    boxes: np.ndarray
    scores: np.ndarray
    class_ids: np.ndarray
    #: no result at all for this frame (split mode: the hub did not answer in time and there is no
    #: local model). Empty, and not "nothing found": samplers must not take it for a negative.
    undecided: bool = False

    def __post_init__(self) -> None:
        boxes = np.asarray(self.boxes, dtype=np.float32)
        if boxes.size == 0:
            boxes = boxes.reshape(0, 4)
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise ValueError(f"boxes must have shape (N, 4), got {boxes.shape}")
        scores = np.asarray(self.scores, dtype=np.float32).reshape(-1)
        class_ids = np.asarray(self.class_ids, dtype=np.int32).reshape(-1)
        if not (len(boxes) == len(scores) == len(class_ids)):
            raise ValueError(
                f"length mismatch: {len(boxes)} boxes, {len(scores)} scores, {len(class_ids)} class_ids"
            )
        if self.undecided and len(scores):
            raise ValueError("undecided detections must be empty")
        object.__setattr__(self, "boxes", boxes)
        object.__setattr__(self, "scores", scores)
        object.__setattr__(self, "class_ids", class_ids)

    @classmethod
    def empty(cls, undecided: bool = False) -> Detections:
        return cls(np.zeros((0, 4), np.float32), np.zeros((0,), np.float32), np.zeros((0,), np.int32), undecided)

    def __len__(self) -> int:
        return len(self.scores)

    def __getitem__(self, index: Any) -> Detections:
        """Select by boolean mask, index array or slice; always returns Detections."""
        if isinstance(index, (int, np.integer)):
            index = [int(index)]
        return Detections(self.boxes[index], self.scores[index], self.class_ids[index])

    def filter(self, min_score: float) -> Detections:
        return self[self.scores >= min_score]

    @classmethod
    def concat(cls, items: Sequence[Detections]) -> Detections:
        if not items:
            return cls.empty()
        return cls(
            np.concatenate([d.boxes for d in items]),
            np.concatenate([d.scores for d in items]),
            np.concatenate([d.class_ids for d in items]),
        )

    def to_records(self, class_names: Sequence[str], ndigits: int = 2) -> list[dict[str, Any]]:
        """The per-detection JSON records of results.jsonl: ``{"cls", "score", "box"}``."""
        out = []
        for box, score, cid in zip(self.boxes, self.scores, self.class_ids, strict=True):
            out.append(
                {
                    "cls": class_names[int(cid)],
                    "score": round(float(score), 4),
                    "box": [round(float(v), ndigits) for v in box],
                }
            )
        return out
