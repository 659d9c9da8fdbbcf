"""One independent dataset scene: belt, 0-4 parts, camera; with defect and part labels."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from models.synth.background import apply_rails, belt_band, belt_strip, sample_belt_style
from models.synth.camera import apply_camera, sample_camera
from models.synth.lines import LINES, LineSpec
from models.synth.sprite import PartSprite, mark_boxes, part_box, paste_sprite, render_part, sample_part_spec

__all__ = ["SceneResult", "render_scene"]

#: A defect partly outside the frame keeps its label only if this much of it is visible;
#: otherwise the part is re-rendered without it (no unlabelled slivers on "good" parts).
MIN_VISIBLE_DEFECT = 0.5


@dataclass
class SceneResult:
    """A rendered scene: uint8 BGR image, defect boxes (pixels) and part records."""

    image: np.ndarray
    jpeg_quality: int
    objects: list[tuple[int, tuple[float, float, float, float]]] = field(default_factory=list)
    parts: list[dict] = field(default_factory=list)


def _place(
    rng: np.random.Generator,
    sprite: PartSprite,
    taken: list[tuple[float, float, float, float]],
    band: tuple[int, int],
    width: int,
    margin: float,
) -> tuple[int, int] | None:
    """Top-left sprite position so the part sits on the belt, at most ~35% outside the frame
    sideways and apart from the parts already placed."""
    bx0, by0, bx1, by1 = sprite.bbox
    pw, ph = bx1 - bx0, by1 - by0
    for _ in range(30):
        left = rng.uniform(-0.35 * pw, width - 0.65 * pw)
        room = band[1] - band[0] - ph - 2 * margin
        top = band[0] + margin + (rng.uniform(0, room) if room > 0 else room / 2)
        box = (left, top, left + pw, top + ph)
        if all(box[2] + margin < t[0] or t[2] + margin < box[0] or box[3] + margin < t[1]
               or t[3] + margin < box[1] for t in taken):
            taken.append(box)
            return int(round(left)) - bx0, int(round(top)) - by0
    return None


def render_scene(
    rng: np.random.Generator, width: int = 1280, height: int = 720, empty_prob: float = 0.03,
    line: LineSpec = LINES["default"],
) -> SceneResult:
    """Render one random scene of ``line``. Deterministic given the generator state; object
    classes are the line's dataset class ids."""
    s = width / 1280.0
    style = sample_belt_style(rng)
    frame = belt_strip(
        style, height, width, s,
        tex_offset=(int(rng.integers(0, max(1, 2305 - width))), int(rng.integers(0, max(1, 1153 - height)))),
        seam_phase=float(rng.uniform(0, style.seam_spacing * s)),
    )
    apply_rails(frame, style, s)
    band = belt_band(style, height, s)
    light = float(rng.uniform(0, 360))
    n_parts = 0 if rng.random() < empty_prob else int(rng.choice([1, 2, 3, 4], p=[0.25, 0.35, 0.25, 0.15]))

    result = SceneResult(image=frame, jpeg_quality=90)
    taken: list[tuple[float, float, float, float]] = []
    for _ in range(n_parts):
        spec = sample_part_spec(rng, line.defect_rate, line.products, line.defects)
        sprite = render_part(spec, s, light)
        pos = _place(rng, sprite, taken, band, width, 10 * s)
        if pos is None:
            continue
        x, y = pos
        marks = mark_boxes(sprite, x, y, width, height)
        cut = [m.index for m, box, frac in marks if box is None or frac < MIN_VISIBLE_DEFECT
               or box[2] - box[0] < 4 or box[3] - box[1] < 4]
        if cut:
            keep = [k not in cut for k in range(len(spec.defects))]
            sprite = render_part(spec, s, light, keep=keep)
            marks = mark_boxes(sprite, x, y, width, height)
        paste_sprite(frame, sprite, x, y)
        pbox, visible = part_box(sprite, x, y, width, height)
        if pbox is None:
            continue
        objs = [(line.class_id(m.cls), box) for m, box, _ in marks if box is not None]
        result.objects.extend(objs)
        result.parts.append({
            "box": [round(v, 2) for v in pbox],
            "product": spec.product,
            "defective": bool(objs),
            "visible": round(visible, 4),
        })
    cam = sample_camera(rng, s)
    result.image = apply_camera(frame, cam, rng)
    result.jpeg_quality = cam.jpeg_quality
    return result
