"""A continuous recorded conveyor: an MP4 (mp4v) plus per-frame ground truth as JSONL.

The belt (texture, joints, lane marker) and the parts move right by a constant integer number
of pixels per frame; each part is rendered once, so its defects keep their shape and move with
it. Lighting drifts slowly; every frame gets fresh sensor noise and motion blur matching speed.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from models.synth.background import apply_rails, belt_band, belt_strip, sample_belt_style
from models.synth.camera import apply_camera, drifted, sample_camera
from models.synth.sprite import PartSprite, mark_boxes, part_box, paste_sprite, render_part, sample_part_spec
from models.taxonomy import DEFAULT_CLASSES

__all__ = ["generate_video"]

#: Objects (defect boxes) with less visible width or height than this are left out of truth.
MIN_OBJECT_PX = 4.0
#: Keyframe interval of the MP4: the belt scene is highly predictable, so long GOPs save space.
KEYFRAME_SECONDS = 2


@dataclass
class _Moving:
    id: int
    sprite: PartSprite
    x0: int  # sprite left at frame 0 (may be far negative)
    y: int

    def x(self, frame: int, speed: int) -> int:
        return self.x0 + speed * frame

    def box_left(self, frame: int, speed: int) -> int:
        return self.x(frame, speed) + self.sprite.bbox[0]


def _r2(box: tuple[float, float, float, float]) -> list[float]:
    return [round(float(v), 2) for v in box]


def _tmp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")


def _open_writer(path: Path, fps: int, width: int, height: int) -> cv2.VideoWriter:
    """mp4v writer with a 2 s keyframe interval (smaller files); plain one where unsupported."""
    # cv2.VideoWriter_fourcc exists at runtime but is missing from the cv2 stubs.
    fourcc = cv2.VideoWriter_fourcc(*"mp4v")  # type: ignore[attr-defined]
    key = getattr(cv2, "VIDEOWRITER_PROP_KEY_INTERVAL", None)
    if key is not None:
        writer = cv2.VideoWriter(str(path), fourcc, float(fps), (width, height), [key, KEYFRAME_SECONDS * fps])
        if writer.isOpened():
            return writer
        writer.release()
    return cv2.VideoWriter(str(path), fourcc, float(fps), (width, height))


def generate_video(
    out_mp4: Path,
    truth_jsonl: Path,
    seed: int = 0,
    seconds: float = 10.0,
    size: tuple[int, int] = (1920, 1080),
    fps: int = 30,
    progress: bool = True,
) -> None:
    """Render ``seconds`` of conveyor footage at ``size`` (w, h) and ``fps`` to ``out_mp4``
    (mp4v) with per-frame truth in ``truth_jsonl``. Both files appear only when complete."""
    width, height = size
    s = width / 1280.0
    n_frames = int(round(seconds * fps))
    rng = np.random.default_rng([seed, 0xF1D0])
    out_mp4, truth_jsonl = Path(out_mp4), Path(truth_jsonl)
    out_mp4.parent.mkdir(parents=True, exist_ok=True)
    truth_jsonl.parent.mkdir(parents=True, exist_ok=True)

    style = sample_belt_style(rng, video=True)
    band = belt_band(style, height, s)
    speed = max(1, int(round(rng.uniform(7, 10) * s * 30.0 / fps)))  # px per frame
    spacing = max(8, int(round(style.seam_spacing * s)))
    style = replace(style, seam_spacing=spacing / s)
    loop = spacing * max(2, math.ceil(2 * width / spacing))
    strip = belt_strip(style, height, loop, s, tex_offset=(int(rng.integers(0, 2304)), 0))
    strip = np.concatenate([strip, strip[:, :width]], axis=1)
    phase0 = int(rng.integers(0, loop))
    light = float(rng.uniform(0, 360))
    cam0 = replace(
        sample_camera(rng, s),
        blur=max(1, int(round(speed * rng.uniform(0.35, 0.55)))),
        # Low noise and slight optical softness keep a 10 s 1080p mp4v file under ~4.5 MB.
        read_noise=float(rng.uniform(0.2, 0.35)),
        shot_noise=0.0,
        soften=0.6 * s,
    )
    phases = rng.random(6)

    tmp_mp4, tmp_jsonl = _tmp_sibling(out_mp4), _tmp_sibling(truth_jsonl)
    writer = _open_writer(tmp_mp4, fps, width, height)
    if not writer.isOpened():
        writer.release()
        tmp_mp4.unlink(missing_ok=True)
        raise RuntimeError(
            f"cv2.VideoWriter could not open {tmp_mp4} with fourcc 'mp4v' at {width}x{height}@{fps}; "
            "this OpenCV build lacks an MPEG-4 encoder (install opencv-python-headless with FFmpeg)"
        )
    try:
        parts: list[_Moving] = []
        next_id = 0
        warmup = -int(math.ceil((width + 400 * s) / speed))
        gap = 0.0
        with tmp_jsonl.open("w") as truth, tqdm(total=n_frames, desc="synth video", unit="frame",
                                                disable=not progress) as bar:
            for i in range(warmup, n_frames):
                # Spawn: the new part's box starts just left of the frame once the gap is free.
                last_left = parts[-1].box_left(i, speed) if parts else 10**9
                if last_left >= gap:
                    spec = sample_part_spec(rng)
                    sprite = render_part(spec, s, light)
                    bx0, by0, bx1, by1 = sprite.bbox
                    left = min(0, last_left - int(gap)) - (bx1 - bx0)
                    room = band[1] - band[0] - (by1 - by0) - 20 * s
                    top = band[0] + 10 * s + (rng.uniform(0, room) if room > 0 else room / 2)
                    parts.append(_Moving(next_id, sprite, left - bx0 - speed * i, int(top) - by0))
                    next_id += 1
                    gap = (rng.uniform(30, 60) + rng.exponential(130)) * s
                parts = [p for p in parts if p.box_left(i, speed) < width]
                if i < 0:
                    continue
                u0 = (phase0 - speed * i) % loop
                frame = strip[:, u0 : u0 + width].copy()
                apply_rails(frame, style, s)
                record: dict = {"frame": i, "pts": i / fps, "objects": [], "parts": []}
                for p in parts:
                    x = p.x(i, speed)
                    paste_sprite(frame, p.sprite, x, p.y)
                    pbox, _ = part_box(p.sprite, x, p.y, width, height)
                    if pbox is None:
                        continue
                    for mark, box, _ in mark_boxes(p.sprite, x, p.y, width, height):
                        if box is not None and box[2] - box[0] >= MIN_OBJECT_PX and box[3] - box[1] >= MIN_OBJECT_PX:
                            record["objects"].append({"cls": DEFAULT_CLASSES[mark.cls], "box": _r2(box)})
                    record["parts"].append({"id": p.id, "product": p.sprite.spec.product, "box": _r2(pbox),
                                            "defective": bool(p.sprite.marks)})
                image = apply_camera(frame, drifted(cam0, i / fps, phases), rng)
                writer.write(image)
                truth.write(json.dumps(record) + "\n")
                bar.update()
        writer.release()
        os.replace(tmp_mp4, out_mp4)
        os.replace(tmp_jsonl, truth_jsonl)
    except BaseException:
        writer.release()
        tmp_mp4.unlink(missing_ok=True)
        tmp_jsonl.unlink(missing_ok=True)
        raise
