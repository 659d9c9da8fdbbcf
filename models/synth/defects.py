"""The defect types, drawn onto an unrotated part surface: the four default classes and porosity.

Each drawer works on a small window around the defect, clips its effect to the part's valid
surface (material, not holes or screw heads), checks the defect is big enough to be detectable
after downscaling to 640 px, and only then changes the pixels. It returns the label mask: the
pixels the defect visibly changed (so the YOLO box is tight around what was drawn).

Sizes are at 1280x720 scale, multiplied by ``s`` (frame width / 1280).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

from models.synth.background import noise_crop

__all__ = ["DEFECT_DRAWERS", "DefectContext", "DrawnDefect", "draw_defect"]


@dataclass
class DefectContext:
    """What a drawer needs to know about the surface it draws on."""

    rgb: np.ndarray  # float32 (h, w, 3), modified in place
    valid: np.ndarray  # float32 (h, w) 0..1, where defects may be drawn
    points: np.ndarray  # int (n, 2) x, y candidate centres (interior of the surface)
    edge_points: np.ndarray  # int (m, 2) x, y on the material boundary (outer edge and holes)
    light: tuple[float, float]  # unit vector towards the light, in canvas coordinates
    scale: float
    taken: list[tuple[int, int, int, int]]  # boxes of defects already drawn on this part


@dataclass
class DrawnDefect:
    """A drawn defect: ``mask`` (bool) covers canvas pixels ``[y0:y0+h, x0:x0+w]``."""

    x0: int
    y0: int
    mask: np.ndarray


def _window(ctx: DefectContext, cx: float, cy: float, half: float) -> tuple[slice, slice] | None:
    h, w = ctx.valid.shape
    x0, x1 = max(0, int(cx - half)), min(w, int(np.ceil(cx + half)) + 1)
    y0, y1 = max(0, int(cy - half)), min(h, int(np.ceil(cy + half)) + 1)
    if x1 - x0 < 4 or y1 - y0 < 4:
        return None
    return slice(y0, y1), slice(x0, x1)


def _accept(ctx: DefectContext, ys: slice, xs: slice, label: np.ndarray) -> DrawnDefect | None:
    """Check size and overlap with earlier defects; return the drawn defect or None."""
    s = ctx.scale
    rows, cols = np.flatnonzero(label.any(axis=1)), np.flatnonzero(label.any(axis=0))
    if rows.size == 0:
        return None
    bh, bw = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
    if max(bh, bw) < 18 * s or min(bh, bw) < 2.5 * s or label.sum() < 40 * s * s:
        return None
    box = (xs.start + cols[0], ys.start + rows[0], xs.start + cols[-1] + 1, ys.start + rows[-1] + 1)
    for tb in ctx.taken:
        iw = min(box[2], tb[2]) - max(box[0], tb[0])
        ih = min(box[3], tb[3]) - max(box[1], tb[1])
        if iw > -4 * s and ih > -4 * s:  # keep defects apart so their boxes stay separate
            return None
    ctx.taken.append(box)
    m = label[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    return DrawnDefect(int(box[0]), int(box[1]), m.copy())


def _surface_level(ctx: DefectContext, ys: slice, xs: slice) -> tuple[np.ndarray, float]:
    patch = ctx.rgb[ys, xs]
    v = ctx.valid[ys, xs]
    wsum = float(v.sum()) + 1e-6
    mean = (patch * v[:, :, None]).reshape(-1, 3).sum(axis=0) / wsum
    return mean.astype(np.float32), float(mean.mean())


def _blend(ctx: DefectContext, ys: slice, xs: slice, alpha: np.ndarray, target: np.ndarray) -> None:
    """``rgb += alpha * (target - rgb)``; target is a colour or a per-pixel image."""
    patch = ctx.rgb[ys, xs]
    patch += alpha[:, :, None] * (target - patch)


def _bezier(p0: np.ndarray, c: np.ndarray, p1: np.ndarray, n: int = 16) -> np.ndarray:
    t = np.linspace(0.0, 1.0, n)[:, None]
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * c + t * t * p1


def _scratch(rng: np.random.Generator, ctx: DefectContext) -> DrawnDefect | None:
    s = ctx.scale
    length = rng.uniform(30, 140) * s
    width = max(3, int(round(rng.uniform(2.5, 5.0) * s)))
    strokes = int(rng.choice([1, 2, 3], p=[0.6, 0.28, 0.12]))
    gap = width + rng.uniform(3, 8) * s
    theta = rng.uniform(0, np.pi)
    cx, cy = ctx.points[rng.integers(len(ctx.points))]
    win = _window(ctx, cx, cy, length / 2 + gap * strokes + 6 * s)
    if win is None:
        return None
    ys, xs = win
    canvas = np.zeros((ys.stop - ys.start, xs.stop - xs.start), np.uint8)
    d = np.array([np.cos(theta), np.sin(theta)])
    nrm = np.array([-d[1], d[0]])
    centre = np.array([cx - xs.start, cy - ys.start], float)
    bend = rng.uniform(-0.15, 0.15) * length
    for k in range(strokes):
        off = (k - (strokes - 1) / 2) * gap
        lk = length * (1.0 if k == 0 else rng.uniform(0.55, 1.0))
        shift = rng.uniform(-0.15, 0.15) * length if k else 0.0
        c0 = centre + nrm * off + d * shift
        pts = _bezier(c0 - d * lk / 2, c0 + nrm * bend, c0 + d * lk / 2)
        val = int(rng.uniform(0.8, 1.0) * 255)
        cv2.polylines(canvas, [np.round(pts * 16).astype(np.int32)], False, val, width, cv2.LINE_AA, 4)
    alpha = cv2.GaussianBlur(canvas.astype(np.float32) / 255.0, (0, 0), 0.5 * s) * ctx.valid[ys, xs]
    drawn = _accept(ctx, ys, xs, alpha > 0.35)
    if drawn is None:
        return None
    col, lum = _surface_level(ctx, ys, xs)
    bright = lum < 95 or (lum <= 165 and rng.random() < 0.5)
    contrast = rng.uniform(55, 95)
    target = np.clip(col + (contrast if bright else -contrast), 8, 250)
    if abs(float(target.mean()) - lum) < 45:  # no room on this side: go the other way
        target = np.clip(col + (-contrast if bright else contrast), 8, 250)
    _blend(ctx, ys, xs, alpha, target)
    return drawn


def _walk(rng: np.random.Generator, start: np.ndarray, heading: float, extent: float, s: float) -> np.ndarray:
    pts, p, travelled, h0 = [start.copy()], start.copy(), 0.0, heading
    while travelled < extent:
        step = rng.uniform(3.0, 6.0) * s
        heading += rng.normal(0.0, 0.4) + 0.35 * (h0 - heading)  # jagged but keeps its course
        p = p + step * np.array([np.cos(heading), np.sin(heading)])
        pts.append(p.copy())
        travelled += step
    return np.array(pts)


def _crack(rng: np.random.Generator, ctx: DefectContext) -> DrawnDefect | None:
    s = ctx.scale
    extent = rng.uniform(25, 100) * s
    if rng.random() < 0.6 and len(ctx.edge_points):
        ex, ey = ctx.edge_points[rng.integers(len(ctx.edge_points))]
        r = int(8 * s)
        h, w = ctx.valid.shape
        local = ctx.valid[max(0, ey - r) : ey + r + 1, max(0, ex - r) : ex + r + 1]
        yy, xx = np.nonzero(local > 0.5)
        if yy.size == 0:
            return None
        inward = np.array([xx.mean() + max(0, ex - r) - ex, yy.mean() + max(0, ey - r) - ey])
        heading = float(np.arctan2(inward[1], inward[0])) + rng.normal(0, 0.35)
        start = np.array([ex, ey], float)
    else:
        start = ctx.points[rng.integers(len(ctx.points))].astype(float)
        heading = rng.uniform(0, 2 * np.pi)
    main = _walk(rng, start, heading, extent, s)
    paths = [main]
    if rng.random() < 0.5 and len(main) > 4:
        j = int(rng.integers(len(main) // 3, 2 * len(main) // 3 + 1))
        b_heading = heading + rng.choice([-1, 1]) * rng.uniform(0.5, 1.1)
        paths.append(_walk(rng, main[j], b_heading, extent * rng.uniform(0.3, 0.6), s))
    allp = np.concatenate(paths)
    lo, hi = allp.min(axis=0), allp.max(axis=0)
    centre = (lo + hi) / 2
    win = _window(ctx, centre[0], centre[1], float((hi - lo).max()) / 2 + 8 * s)
    if win is None:
        return None
    ys, xs = win
    canvas = np.zeros((ys.stop - ys.start, xs.stop - xs.start), np.uint8)
    outer = max(3, int(round(rng.uniform(2.5, 5.0) * s)))
    for i, path in enumerate(paths):
        pts = np.round((path - [xs.start, ys.start]) * 16).astype(np.int32)
        t = max(3, outer - i)
        cv2.polylines(canvas, [pts], False, 150, t, cv2.LINE_AA, 4)
    for i, path in enumerate(paths):
        pts = np.round((path - [xs.start, ys.start]) * 16).astype(np.int32)
        cv2.polylines(canvas, [pts], False, 255, max(1, outer - 2 - i), cv2.LINE_AA, 4)
    alpha = cv2.GaussianBlur(canvas.astype(np.float32) / 255.0, (0, 0), 0.45 * s) * ctx.valid[ys, xs]
    drawn = _accept(ctx, ys, xs, alpha > 0.35)
    if drawn is None:
        return None
    _, lum = _surface_level(ctx, ys, xs)
    if lum < 110:  # plastic: stress-whitened fringe along the dark crack
        halo = np.clip(cv2.GaussianBlur(alpha, (0, 0), 2.0 * s) * 1.6 - alpha, 0, 1) * ctx.valid[ys, xs]
        _blend(ctx, ys, xs, halo * 0.7, np.array([190, 195, 195], np.float32))
    _blend(ctx, ys, xs, alpha * 0.88, np.zeros(3, np.float32))
    return drawn


def _dent(rng: np.random.Generator, ctx: DefectContext) -> DrawnDefect | None:
    s = ctx.scale
    a = rng.uniform(18, 60) * s / 2
    b = a * rng.uniform(0.6, 1.0)
    rot = rng.uniform(0, np.pi)
    cx, cy = ctx.points[rng.integers(len(ctx.points))]
    win = _window(ctx, cx, cy, a * 1.15 + 2)
    if win is None:
        return None
    ys, xs = win
    yy, xx = np.mgrid[ys, xs].astype(np.float32)
    u = (xx - cx) * np.cos(rot) + (yy - cy) * np.sin(rot)
    v = -(xx - cx) * np.sin(rot) + (yy - cy) * np.cos(rot)
    q = (u / a) ** 2 + (v / b) ** 2
    depth = np.where(q < 1.0, (1.0 - q) ** 2, 0.0).astype(np.float32)
    gy, gx = np.gradient(depth)
    lx, ly = ctx.light
    shade = gx * lx + gy * ly  # side towards the light is in shadow, far side lit
    shade /= float(np.abs(shade).max()) + 1e-6
    amp, ao = rng.uniform(45, 80), rng.uniform(8, 20)
    delta = (amp * shade - ao * depth) * ctx.valid[ys, xs]
    drawn = _accept(ctx, ys, xs, np.abs(delta) > 0.18 * amp)
    if drawn is None:
        return None
    ctx.rgb[ys, xs] += delta[:, :, None]
    return drawn


_STAINS = {  # name -> BGR target colour (None: darken the surface itself, oil)
    "rust": np.array([38, 78, 135], np.float32),
    "yellow": np.array([85, 180, 215], np.float32),
    "oil": None,
    "residue": np.array([222, 226, 226], np.float32),
}


def _stain(rng: np.random.Generator, ctx: DefectContext) -> DrawnDefect | None:
    s = ctx.scale
    size = rng.uniform(26, 95) * s  # nominal; the thresholded blob is ~18-80 px
    cx, cy = ctx.points[rng.integers(len(ctx.points))]
    win = _window(ctx, cx, cy, size * 0.75 + 4 * s)
    if win is None:
        return None
    ys, xs = win
    hh, ww = ys.stop - ys.start, xs.stop - xs.start
    canvas = np.zeros((hh, ww), np.uint8)
    lc = np.array([cx - xs.start, cy - ys.start])
    for _ in range(int(rng.integers(3, 8))):
        c = lc + rng.normal(0, size * 0.16, 2)
        axes = (int(size * rng.uniform(0.14, 0.32) * 16), int(size * rng.uniform(0.1, 0.26) * 16))
        cv2.ellipse(canvas, (int(c[0] * 16), int(c[1] * 16)), axes, rng.uniform(0, 180), 0, 360,
                    255, -1, cv2.LINE_AA, 4)
    m: np.ndarray = cv2.GaussianBlur(canvas.astype(np.float32) / 255.0, (0, 0), size * rng.uniform(0.05, 0.1))
    m *= 1.0 + 0.3 * noise_crop("fine" if rng.random() < 0.5 else "mottle", hh, ww,
                                int(rng.integers(2000)), int(rng.integers(1000)))
    cover = np.clip((m - 0.3) / 0.45, 0.0, 1.0) * ctx.valid[ys, xs]
    drawn = _accept(ctx, ys, xs, cover > 0.45)
    if drawn is None:
        return None
    col, lum = _surface_level(ctx, ys, xs)
    dist = {k: float(np.linalg.norm((0.4 * col if t is None else t) - col)) for k, t in _STAINS.items()}
    options = [k for k, d in dist.items() if d >= 75]
    kind = options[int(rng.integers(len(options)))] if options else max(dist, key=dist.__getitem__)
    opacity = rng.uniform(0.72, 0.95)
    target = _STAINS[kind]
    if target is None:
        target = ctx.rgb[ys, xs] * np.array([0.45, 0.4, 0.36], np.float32)
    _blend(ctx, ys, xs, cover * opacity, target)
    return drawn


def _porosity(rng: np.random.Generator, ctx: DefectContext) -> DrawnDefect | None:
    """Gas porosity: a cluster of small round pits (dark bottom, lit far rim), a casting defect
    none of the four default classes looks like. Not drawn on the default line (issue 6's
    "defect type the model never saw")."""
    s = ctx.scale
    spread = rng.uniform(10, 32) * s
    n = int(rng.integers(6, 22))
    cx, cy = ctx.points[rng.integers(len(ctx.points))]
    win = _window(ctx, cx, cy, spread + 6 * s)
    if win is None:
        return None
    ys, xs = win
    yy, xx = np.mgrid[ys, xs].astype(np.float32)
    depth = np.zeros(yy.shape, np.float32)
    ang = rng.uniform(0, np.pi)
    squash = rng.uniform(0.45, 1.0)
    for _ in range(n):
        u, v = rng.normal(0, 0.45, 2)
        u, v = u * spread, v * spread * squash
        px = cx + u * np.cos(ang) - v * np.sin(ang)
        py = cy + u * np.sin(ang) + v * np.cos(ang)
        r = rng.uniform(1.3, 3.6) * s
        q = ((xx - px) ** 2 + (yy - py) ** 2) / (r * r)
        depth = np.maximum(depth, np.where(q < 1.0, 1.0 - q * q, 0.0).astype(np.float32))
    gy, gx = np.gradient(cv2.GaussianBlur(depth, (0, 0), 0.6 * s))
    lx, ly = ctx.light
    rim = gx * lx + gy * ly
    rim /= float(np.abs(rim).max()) + 1e-6
    v = ctx.valid[ys, xs]
    _, lum = _surface_level(ctx, ys, xs)
    dark = rng.uniform(0.55, 0.8) * lum
    delta = (-dark * depth + rng.uniform(25, 45) * rim) * v
    drawn = _accept(ctx, ys, xs, (depth > 0.25) & (v > 0.5))
    if drawn is None:
        return None
    ctx.rgb[ys, xs] += delta[:, :, None]
    np.clip(ctx.rgb[ys, xs], 0, 255, out=ctx.rgb[ys, xs])
    return drawn


#: Drawer per defect id: the ids of ``models.taxonomy.DEFECT_CATALOGUE`` (the four default
#: classes first, in ``DEFAULT_CLASSES`` order, then defect types the default line never shows).
DEFECT_DRAWERS: tuple[Callable[[np.random.Generator, DefectContext], DrawnDefect | None], ...] = (
    _scratch,
    _crack,
    _dent,
    _stain,
    _porosity,
)


def draw_defect(cls_id: int, rng: np.random.Generator, ctx: DefectContext, tries: int = 12) -> DrawnDefect | None:
    """Draw one defect of class ``cls_id``; retry placements that are too small or overlap."""
    if len(ctx.points) == 0:
        return None
    for _ in range(tries):
        drawn = DEFECT_DRAWERS[cls_id](rng, ctx)
        if drawn is not None:
            return drawn
    return None
