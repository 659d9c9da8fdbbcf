"""Training crops at the model's own scale: what makes retraining affordable on a CPU hub.

A detector is convolutional: trained on square crops of frames scaled as the agents scale them
(:func:`models.processing.resize_for_input`: the letterbox's ratio and interpolation for the
model's input size), it sees every object at the size it will meet it in the
field, and each training image costs the crop's pixels instead of the frame's. A 320 px crop is
a fifth of a 544x960 frame and a ninth of the 960 px square the GPU preset trains on.

Crops are placed where the labels are (every labelled box ends up whole inside at least one
crop, at a random position in it) plus ``background`` random crops per frame, so the model still
sees parts, belts and edges without a defect. A box cut by a crop's edge keeps its label when
``min_visible`` of its area is inside (Ultralytics' own augmentation drops boxes below 10%);
otherwise it is dropped. Frames without labels give background crops only.

The crops go to a split of their own beside the frames (``images/train_crops``): validation and
the INT8 calibration keep whole frames (the release scores and calibrates at the production input
size, where a crop would be mostly letterbox padding).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.dataset_io import IMAGE_SUFFIXES, read_label_file, yolo_label_line

__all__ = ["CropPlan", "crop_split", "place_crops"]

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class CropPlan:
    size: int = 320  #: crop side in px, at the model's input scale
    #: the model's input (h, w): frames are scaled as the agents letterbox them into it
    input_hw: tuple[int, int] = (544, 960)
    background: int = 1  #: random crops per frame besides the ones placed on labels
    min_visible: float = 0.4  #: share of a cut box's area that must be inside the crop to keep its label
    #: crop placements per frame the caller marks as new data (the reviewed samples, against the
    #: replay buffer): each placement is drawn afresh, so a new defect is seen at other positions
    new_data_repeats: int = 1

    def __post_init__(self) -> None:
        if not 32 <= self.size <= max(self.input_hw):
            raise ValueError(f"crop size {self.size} must be between 32 and the input's long side "
                             f"({max(self.input_hw)})")
        if self.background < 0:
            raise ValueError(f"background crops per frame must be >= 0, got {self.background}")
        if not 0.0 < self.min_visible <= 1.0:
            raise ValueError(f"min_visible must be in (0, 1], got {self.min_visible}")
        if self.new_data_repeats < 1:
            raise ValueError(f"new_data_repeats must be >= 1, got {self.new_data_repeats}")


def _window_over(lo: float, hi: float, size: int, extent: int, rng: random.Random) -> int:
    """A window start in [0, extent - size] whose window holds [lo, hi] (centred on it when it cannot)."""
    top = max(extent - size, 0)
    if hi - lo >= size:
        return int(min(max((lo + hi - size) / 2, 0), top))
    first, last = max(int(np.ceil(hi)) - size, 0), min(int(lo), top)
    return rng.randint(first, last) if first <= last else int(min(max(lo, 0), top))


def place_crops(boxes: np.ndarray, width: int, height: int, plan: CropPlan,
                rng: random.Random) -> list[tuple[int, int]]:
    """Top-left corners of the crops for one frame (``boxes``: ``(N, 4)`` xyxy px at the scaled size).

    Each box is whole inside some crop (a box larger than the crop is centred in one); boxes are
    visited in random order and one already inside an earlier crop gets none of its own.
    """
    size = plan.size
    corners: list[tuple[int, int]] = []
    for i in rng.sample(range(len(boxes)), len(boxes)):
        x1, y1, x2, y2 = (float(v) for v in boxes[i])
        if any(x <= x1 and y <= y1 and x2 <= x + size and y2 <= y + size for x, y in corners):
            continue
        corners.append((_window_over(x1, x2, size, width, rng), _window_over(y1, y2, size, height, rng)))
    for _ in range(plan.background):
        corners.append((rng.randint(0, max(width - size, 0)), rng.randint(0, max(height - size, 0))))
    return corners


def _labels_in(labels: np.ndarray, x: int, y: int, size: int, min_visible: float) -> np.ndarray:
    """``labels`` (``[cls, x1, y1, x2, y2]``) clipped to the crop at (x, y); boxes mostly outside dropped."""
    if not len(labels):
        return labels
    clipped = labels.copy()
    clipped[:, [1, 3]] = np.clip(labels[:, [1, 3]] - x, 0, size)
    clipped[:, [2, 4]] = np.clip(labels[:, [2, 4]] - y, 0, size)
    area = (labels[:, 3] - labels[:, 1]) * (labels[:, 4] - labels[:, 2])
    inside = (clipped[:, 3] - clipped[:, 1]) * (clipped[:, 4] - clipped[:, 2])
    keep = (inside > 0) & (inside >= min_visible * np.maximum(area, 1e-9))
    return clipped[keep]


def _label_text(labels: np.ndarray, size: int) -> str:
    return "".join(yolo_label_line(int(row[0]), row[1:], size, size) + "\n" for row in labels.tolist())


def crop_split(root: Path, split: str, into: str, nc: int, plan: CropPlan, seed: int = 0,
               is_new: Callable[[Path], bool] = lambda path: False) -> tuple[int, int]:
    """Write crops of ``root``'s ``split`` (YOLO layout) as its split ``into``; returns (frames, crops).

    Frames ``is_new`` says are new data get ``plan.new_data_repeats`` placements of crops.

    Crops are PNG (no second lossy encoding); a half-written ``into`` from a crash is replaced.
    """
    import shutil

    import cv2

    from models.processing import PAD_VALUE, resize_for_input

    rng = random.Random(seed)
    images = sorted(p for p in (root / "images" / split).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    out_img, out_lab = root / "images" / into, root / "labels" / into
    for d in (out_img, out_lab):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    crops = 0
    for path in images:
        frame = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if frame is None:
            raise ValueError(f"{path}: cannot decode image")
        frame, _ = resize_for_input(frame, plan.input_hw)
        h, w = frame.shape[:2]
        labels = read_label_file(root / "labels" / split / f"{path.stem}.txt", nc, w, h)
        corners = [c for _ in range(plan.new_data_repeats if is_new(path) else 1)
                   for c in place_crops(labels[:, 1:], w, h, plan, rng)]
        for k, (x, y) in enumerate(corners):
            tile = np.full((plan.size, plan.size, 3), PAD_VALUE, np.uint8)  # a frame smaller than the crop: padded grey
            piece = frame[y:y + plan.size, x:x + plan.size]
            tile[:piece.shape[0], :piece.shape[1]] = piece
            name = f"{path.stem}_c{k}"
            if not cv2.imwrite(str(out_img / f"{name}.png"), tile):
                raise OSError(f"cannot write {out_img / name}.png")
            (out_lab / f"{name}.txt").write_text(_label_text(_labels_in(labels, x, y, plan.size,
                                                                         plan.min_visible), plan.size))
            crops += 1
    log.info("cropped %d %s frames of %s into %d crops of %d px", len(images), split, root, crops, plan.size)
    return len(images), crops
