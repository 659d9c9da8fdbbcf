"""Part instances: sampling a part, rendering it (surface + defects + shading, rotated) to a
sprite, and compositing sprites into a frame with their part and defect boxes.

A :class:`PartSpec` fully determines its sprite, so the video renders each part once and moves
the same pixels (defects included) across the frame, and the dataset can re-render a part with
some defects left out when they would be cut off by the frame edge.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from models.synth.defects import DefectContext, DrawnDefect, draw_defect
from models.synth.parts import draw_surface
from models.taxonomy import DEFAULT_CLASSES, PRODUCT_TYPES

__all__ = [
    "DefectMark",
    "PartSpec",
    "PartSprite",
    "clip_box",
    "paste_sprite",
    "render_part",
    "sample_part_spec",
]

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class PartSpec:
    """One part instance; ``seed`` drives every drawing decision of its sprite."""

    product: str
    seed: int
    size: float  # longest side, px at 1280 scale
    angle: float  # degrees, counter-clockwise
    defects: tuple[int, ...]  # DEFECT_CATALOGUE ids to draw (some may fail to fit and be skipped)


@dataclass
class DefectMark:
    """A drawn defect in sprite coordinates: ``mask`` covers ``[y0:y0+h, x0:x0+w]``."""

    index: int  # position in ``PartSpec.defects``
    cls: int  # DEFECT_CATALOGUE id
    x0: int
    y0: int
    mask: np.ndarray  # bool


@dataclass
class PartSprite:
    """A rendered, rotated part: premultiplied colour, alpha, soft cast shadow, defect masks."""

    spec: PartSpec
    prgb: np.ndarray  # float32 (h, w, 3), colour * alpha
    alpha: np.ndarray  # float32 (h, w)
    under: np.ndarray  # float32 (h, w, 3): factor on what lies below (1 - alpha) * (1 - shadow)
    marks: list[DefectMark]
    bbox: tuple[int, int, int, int]  # tight box of alpha > 0.5 in sprite coordinates
    area: float  # number of part pixels (alpha > 0.5)


def sample_part_spec(
    rng: np.random.Generator,
    defect_rate: float = 0.3,
    products: Sequence[str] = PRODUCT_TYPES,
    defect_ids: Sequence[int] = tuple(range(len(DEFAULT_CLASSES))),
) -> PartSpec:
    """A random part: product, size 180-360 px, small rotation, and usually no defect.

    ``products`` and ``defect_ids`` (ids into ``DEFECT_CATALOGUE``) are a line's; the defaults
    draw exactly what they always drew (the default dataset stays byte-identical)."""
    product = products[int(rng.integers(len(products)))]
    size = float(rng.uniform(180, 360) if product != "flange" else rng.uniform(180, 320))
    angle = float(rng.normal(0, 7)) if product != "flange" else float(rng.uniform(0, 360))
    defects: tuple[int, ...] = ()
    if rng.random() < defect_rate:
        n = int(rng.choice([1, 2, 3], p=[0.55, 0.3, 0.15]))
        defects = tuple(int(defect_ids[int(c)]) for c in rng.integers(0, len(defect_ids), n))
    return PartSpec(product, int(rng.integers(0, 2**62)), size, angle, defects)


def _boundary_points(mask: np.ndarray, step: int) -> np.ndarray:
    contours, _ = cv2.findContours(mask, cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return np.zeros((0, 2), np.int64)
    pts = np.concatenate([c.reshape(-1, 2) for c in contours])
    return pts[::step].astype(np.int64)


def render_part(
    spec: PartSpec, scale: float, light_deg: float, keep: Sequence[bool] | None = None
) -> PartSprite:
    """Render ``spec`` at ``scale`` lit from ``light_deg`` (image coordinates, y down).

    ``keep[k]`` False leaves out defect ``k``; everything else is identical.
    """
    rng = np.random.default_rng(spec.seed)
    surf = draw_surface(spec.product, rng, scale, spec.size)
    h, w = surf.mask.shape
    s = scale
    rot = cv2.getRotationMatrix2D((w / 2.0, h / 2.0), spec.angle, 1.0)
    light_img = np.array([np.cos(np.radians(light_deg)), np.sin(np.radians(light_deg))])
    light_local = rot[:, :2].T @ light_img  # canvas direction that maps onto the light

    ker = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (int(6 * s) | 1,) * 2)
    valid_u8 = cv2.erode(surf.mask, ker)
    valid_u8[surf.keepout > 0] = 0
    valid = cv2.GaussianBlur(valid_u8.astype(np.float32) / 255.0, (0, 0), 0.8 * s)
    interior = cv2.erode(valid_u8, ker)
    pts = np.column_stack(np.nonzero(interior)[::-1])
    ctx = DefectContext(
        rgb=surf.rgb,
        valid=valid,
        points=pts[:: max(1, len(pts) // 4000)] if len(pts) else pts,
        edge_points=_boundary_points(valid_u8, max(1, int(3 * s))),
        light=(float(light_local[0]), float(light_local[1])),
        scale=s,
        taken=[],
    )
    local_marks: list[tuple[int, int, DrawnDefect]] = []
    for k, cls in enumerate(spec.defects):
        drng = np.random.default_rng([spec.seed % (2**32), k, 7])
        if keep is not None and not keep[k]:
            ctx.rgb = surf.rgb.copy()  # draw into a scratch copy so later defects stay the same
            draw_defect(cls, drng, ctx)
            ctx.rgb = surf.rgb
            continue
        drawn = draw_defect(cls, drng, ctx)
        if drawn is not None:
            local_marks.append((k, cls, drawn))

    # Bevel / edge shading from the height map, lit from the same direction as the dents.
    hb = cv2.GaussianBlur(surf.height, (0, 0), 1.6 * s)
    gx = cv2.Sobel(hb, cv2.CV_32F, 1, 0, ksize=3, scale=0.125)
    gy = cv2.Sobel(hb, cv2.CV_32F, 0, 1, ksize=3, scale=0.125)
    shade = 1.0 - 1.3 * s * (gx * ctx.light[0] + gy * ctx.light[1])
    shade = np.clip(shade, 0.45, 1.6)
    rgb = surf.rgb * cv2.merge([shade, shade, shade])
    np.clip(rgb, 0, 255, out=rgb)

    # Rotate: output canvas holds the rotated part plus room for the cast shadow.
    cos, sin = abs(rot[0, 0]), abs(rot[0, 1])
    pad = int(np.ceil(18 * s))
    ow = int(np.ceil(w * cos + h * sin)) + 2 * pad
    oh = int(np.ceil(w * sin + h * cos)) + 2 * pad
    rot[0, 2] += ow / 2.0 - w / 2.0
    rot[1, 2] += oh / 2.0 - h / 2.0
    alpha_u = surf.mask.astype(np.float32) / 255.0
    b, g, r = cv2.split(rgb)
    stack = cv2.merge([b * alpha_u, g * alpha_u, r * alpha_u, alpha_u])
    out = cv2.warpAffine(stack, rot, (ow, oh), flags=cv2.INTER_LINEAR, borderValue=0)
    *bgr, alpha = cv2.split(out)
    prgb = cv2.merge(bgr)

    marks = []
    for k, cls, drawn in local_marks:
        mh, mw = drawn.mask.shape
        m = rot.copy()
        m[:, 2] += m[:, :2] @ np.array([drawn.x0, drawn.y0], float)
        corners = m[:, :2] @ np.array([[0, mw, 0, mw], [0, 0, mh, mh]], float) + m[:, 2:3]
        x0, y0 = int(np.floor(corners[0].min())) - 1, int(np.floor(corners[1].min())) - 1
        x1, y1 = int(np.ceil(corners[0].max())) + 2, int(np.ceil(corners[1].max())) + 2
        m[:, 2] -= (x0, y0)
        warped = cv2.warpAffine(drawn.mask.astype(np.float32), m, (x1 - x0, y1 - y0),
                                flags=cv2.INTER_LINEAR) > 0.5
        marks.append(DefectMark(k, cls, x0, y0, warped))

    # Soft cast shadow, offset away from the light.
    off = -light_img * rng.uniform(5, 11) * s
    shift = np.array([[1, 0, off[0]], [0, 1, off[1]]], np.float32)
    shadow = cv2.warpAffine(alpha, shift, (ow, oh), flags=cv2.INTER_LINEAR, borderValue=0)
    shadow = cv2.GaussianBlur(shadow, (0, 0), rng.uniform(4, 7) * s) * rng.uniform(0.3, 0.5)

    unshadowed = (1.0 - shadow) * (1.0 - alpha)
    under = cv2.merge([unshadowed, unshadowed, unshadowed])
    on = alpha > 0.5
    rows, cols = np.flatnonzero(on.any(axis=1)), np.flatnonzero(on.any(axis=0))
    bbox = (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)
    return PartSprite(spec, prgb, alpha, under, marks, bbox, float(on.sum()))


def clip_box(box: Box, width: int, height: int) -> Box | None:
    """Clip ``(x1, y1, x2, y2)`` to the frame; None when nothing is left."""
    x1, y1 = max(0.0, box[0]), max(0.0, box[1])
    x2, y2 = min(float(width), box[2]), min(float(height), box[3])
    return (x1, y1, x2, y2) if x2 > x1 and y2 > y1 else None


def _mask_box(mask: np.ndarray, x: int, y: int, width: int, height: int) -> tuple[Box | None, float]:
    """Box (frame coordinates) of the visible part of ``mask`` placed at (x, y), and the visible
    fraction of its pixels."""
    mh, mw = mask.shape
    cx0, cy0 = max(0, -x), max(0, -y)
    cx1, cy1 = min(mw, width - x), min(mh, height - y)
    if cx1 <= cx0 or cy1 <= cy0:
        return None, 0.0
    vis = mask[cy0:cy1, cx0:cx1]
    rows, cols = np.flatnonzero(vis.any(axis=1)), np.flatnonzero(vis.any(axis=0))
    if rows.size == 0:
        return None, 0.0
    total = float(mask.sum())
    frac = float(vis.sum()) / total if total else 0.0
    box = (x + cx0 + cols[0], y + cy0 + rows[0], x + cx0 + cols[-1] + 1, y + cy0 + rows[-1] + 1)
    return tuple(float(v) for v in box), frac  # type: ignore[return-value]


def part_box(sprite: PartSprite, x: int, y: int, width: int, height: int) -> tuple[Box | None, float]:
    """Visible part box in frame coordinates and the visible fraction of the part."""
    bx0, by0, bx1, by1 = sprite.bbox
    return _mask_box(sprite.alpha[by0:by1, bx0:bx1] > 0.5, x + bx0, y + by0, width, height)


def mark_boxes(
    sprite: PartSprite, x: int, y: int, width: int, height: int
) -> list[tuple[DefectMark, Box | None, float]]:
    """Per defect: its visible box in frame coordinates and the visible fraction of its pixels."""
    return [(m, *_mask_box(m.mask, x + m.x0, y + m.y0, width, height)) for m in sprite.marks]


def paste_sprite(frame: np.ndarray, sprite: PartSprite, x: int, y: int) -> None:
    """Composite ``sprite`` with its top-left corner at (x, y) into float32 ``frame``, in place."""
    fh, fw = frame.shape[:2]
    sh, sw = sprite.alpha.shape
    x0, y0, x1, y1 = max(0, x), max(0, y), min(fw, x + sw), min(fh, y + sh)
    if x1 <= x0 or y1 <= y0:
        return
    sx, sy = slice(x0 - x, x1 - x), slice(y0 - y, y1 - y)
    region = frame[y0:y1, x0:x1]
    region *= sprite.under[sy, sx]
    region += sprite.prgb[sy, sx]
