"""Product surfaces: brackets, flanges, casings (and covers) with their legitimate features.

A :class:`Surface` is one part drawn unrotated on its own float32 canvas: colour, alpha (through
holes are transparent), a height map (for edge/bevel shading) and a keep-out mask (screw and bolt
heads, where defects are not drawn). Distractors that a real line has - mounting holes, slots,
bolts, screws, printed labels, brushed texture, specular bands - live here, never defects.
"""

from __future__ import annotations

import string
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

from models.synth.background import _tinted, noise_crop

__all__ = ["PRODUCT_DRAWERS", "Surface", "draw_surface"]


@dataclass
class Surface:
    """An unrotated part on its canvas; the part's centre is the canvas centre."""

    rgb: np.ndarray  # float32 (h, w, 3) BGR
    mask: np.ndarray  # uint8 (h, w), 255 on material (holes are 0)
    height: np.ndarray  # float32 (h, w), 0 off the part, ~1 on it
    keepout: np.ndarray  # uint8 (h, w), 255 where defects must not be drawn


def _canvas(w: float, h: float, margin: float) -> tuple[int, int, float, float]:
    cw, ch = int(np.ceil(w + 2 * margin)), int(np.ceil(h + 2 * margin))
    return cw, ch, cw / 2.0, ch / 2.0


def _round_corners(mask: np.ndarray, poly: np.ndarray, radius: float) -> None:
    """Fill the rectilinear polygon ``poly`` into ``mask`` with its convex corners rounded."""
    cv2.fillPoly(mask, [np.round(poly * 16).astype(np.int32)], 255, cv2.LINE_AA, 4)
    n = len(poly)
    for i in range(n):
        v, prev, nxt = poly[i], poly[i - 1], poly[(i + 1) % n]
        e1 = (prev - v) / (np.linalg.norm(prev - v) + 1e-9)
        e2 = (nxt - v) / (np.linalg.norm(nxt - v) + 1e-9)
        probe = v + (e1 + e2) * 0.5 * radius
        h, w = mask.shape
        if not (0 <= probe[0] < w and 0 <= probe[1] < h) or mask[int(probe[1]), int(probe[0])] == 0:
            continue  # concave corner: leave it sharp
        c = v + (e1 + e2) * radius
        quad = np.array([v - (e1 + e2), v + e1 * radius, c, v + e2 * radius])
        cv2.fillPoly(mask, [np.round(quad * 16).astype(np.int32)], 0, cv2.LINE_AA, 4)
        cv2.circle(mask, _pt(c[0], c[1]), int(round(radius * 16)), 255, -1, cv2.LINE_AA, 4)


def _rect(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], np.float64)


def _pt(x: float, y: float) -> tuple[int, int]:
    return int(round(x * 16)), int(round(y * 16))


def _disc(img: np.ndarray, x: float, y: float, r: float, value: float | tuple, fill: bool = True) -> None:
    cv2.circle(img, _pt(x, y), int(round(r * 16)), value, -1 if fill else 1, cv2.LINE_AA, 4)


def _texture(kind: str, rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    tex = noise_crop(kind, h, w, int(rng.integers(0, 2304)), int(rng.integers(0, 1152)))
    return tex[::-1] if rng.random() < 0.5 else tex


def _specular(rng: np.random.Generator, h: int, w: int, size: float) -> np.ndarray:
    """A broad, soft, single-sided highlight band (much larger than any dent)."""
    ang = rng.uniform(0, np.pi)
    ys, xs = np.ogrid[0:h, 0:w]
    d = (xs - w / 2) * np.cos(ang) + (ys - h / 2) * np.sin(ang) - rng.uniform(-0.3, 0.3) * size
    sigma = rng.uniform(0.12, 0.25) * size
    return (rng.uniform(12, 32) * np.exp(-(d * d) / (2 * sigma * sigma))).astype(np.float32)


def _metal_colour(rng: np.random.Generator) -> np.ndarray:
    g = rng.uniform(125, 190)
    return np.array([g * rng.uniform(1.0, 1.06), g, g * rng.uniform(0.93, 1.0)], np.float32)


def _bracket(rng: np.random.Generator, s: float, size: float) -> Surface:
    pw, ph = size * s, size * s * rng.uniform(0.45, 0.75)
    cw, ch, cx, cy = _canvas(pw, ph, 6 * s)
    x0, y0, x1, y1 = cx - pw / 2, cy - ph / 2, cx + pw / 2, cy + ph / 2
    mask = np.zeros((ch, cw), np.uint8)
    l_shape = rng.random() < 0.4
    if l_shape:  # plate with one corner notched away
        nw, nh = pw * rng.uniform(0.4, 0.6), ph * rng.uniform(0.4, 0.6)
        poly = [(x0, y0), (x1 - nw, y0), (x1 - nw, y0 + nh), (x1, y0 + nh), (x1, y1), (x0, y1)]
        pts = np.array(poly, np.float64)
        if rng.random() < 0.5:
            pts[:, 0] = 2 * cx - pts[:, 0]
            pts = pts[::-1]
        if rng.random() < 0.5:
            pts[:, 1] = 2 * cy - pts[:, 1]
            pts = pts[::-1]
    else:
        pts = _rect(x0, y0, x1, y1)
    _round_corners(mask, pts, rng.uniform(6, 18) * s)

    col = _metal_colour(rng)
    grey = np.full((ch, cw), 1.0, np.float32) + rng.uniform(0.025, 0.05) * _texture("brushed", rng, ch, cw)
    if rng.random() < 0.65:
        grey += _specular(rng, ch, cw, pw) / float(col.mean())
    rgb = _tinted(grey, col)
    height = (mask > 0).astype(np.float32)
    keepout = np.zeros_like(mask)

    # Mounting holes near the corners, where there is material around them.
    rh = rng.uniform(7, 13) * s
    inner = cv2.erode(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (int(2 * rh + 8 * s) | 1,) * 2))
    inset = rh + rng.uniform(8, 16) * s
    cands = [(x, y) for x in (x0 + inset, cx, x1 - inset) for y in (y0 + inset, y1 - inset)]
    rng.shuffle(cands)
    holes = 0
    for hx, hy in cands:
        if holes >= 4 or (hx == cx and rng.random() < 0.7):
            continue
        if inner[int(hy), int(hx)] and rng.random() < 0.8:
            _disc(mask, hx, hy, rh, 0)
            _disc(rgb, hx, hy, rh + 2.5 * s, tuple(float(v) * 0.8 for v in col))  # countersink ring
            holes += 1
    if rng.random() < 0.35 and inner[int(cy), int(cx)]:  # a slot (stadium) in the middle
        half = rng.uniform(14, 28) * s
        a = rng.choice([0.0, np.pi / 2])
        p0 = _pt(cx - half * np.cos(a), cy - half * np.sin(a))
        p1 = _pt(cx + half * np.cos(a), cy + half * np.sin(a))
        cv2.line(mask, p0, p1, 0, int(2 * rh * 0.8), cv2.LINE_AA, 4)
    height[mask == 0] = 0.0
    return Surface(rgb, mask, height, keepout)


def _flange(rng: np.random.Generator, s: float, size: float) -> Surface:
    r_out = size * s / 2
    cw, ch, cx, cy = _canvas(2 * r_out, 2 * r_out, 6 * s)
    ys, xs = np.ogrid[0:ch, 0:cw]
    dx, dy = (xs - cx).astype(np.float32), (ys - cy).astype(np.float32)
    rad = np.sqrt(dx * dx + dy * dy)
    theta = np.arctan2(dy, dx)
    mask = np.zeros((ch, cw), np.uint8)
    _disc(mask, cx, cy, r_out, 255)
    r_bore = r_out * rng.uniform(0.2, 0.34)
    r_hub = r_bore + r_out * rng.uniform(0.12, 0.2)
    r_bolt = (r_hub + r_out) / 2
    r_hole = min(r_out * rng.uniform(0.06, 0.09), (r_out - r_hub) * 0.28)

    col = _metal_colour(rng)
    phi = rng.uniform(0, np.pi)
    lathe = rng.uniform(1.5, 3.5) * np.sin(rad * (2 * np.pi / (rng.uniform(3.0, 5.0) * s)))
    shade = 1.0 + rng.uniform(0.08, 0.18) * np.cos(2 * (theta - phi)) * np.minimum(rad / r_out, 1.0)
    grey = shade + 0.02 * _texture("fine", rng, ch, cw) + lathe / 160.0
    grey = grey.astype(np.float32)
    if rng.random() < 0.4:
        grey += _specular(rng, ch, cw, 2 * r_out) / float(col.mean())
    rgb = _tinted(grey, col)

    height = np.where(rad < r_hub, 1.3, 1.0).astype(np.float32)  # raised hub
    keepout = np.zeros_like(mask)
    _disc(mask, cx, cy, r_bore, 0)
    n = int(rng.choice([4, 6, 8]))
    a0 = rng.uniform(0, 2 * np.pi)
    bolted = rng.random() < 0.5
    for k in range(n):
        a = a0 + 2 * np.pi * k / n
        hx, hy = cx + r_bolt * np.cos(a), cy + r_bolt * np.sin(a)
        if bolted and rng.random() < 0.85:  # hex bolt head sitting in the hole
            rr = r_hole * 1.5
            hexa = [_pt(hx + rr * np.cos(a + j * np.pi / 3), hy + rr * np.sin(a + j * np.pi / 3))
                    for j in range(6)]
            poly = np.array(hexa, np.int32)
            bolt = float(col.mean() * rng.choice([0.6, 1.15]))
            cv2.fillPoly(rgb, [poly], (bolt, bolt, bolt * 0.97), cv2.LINE_AA, 4)
            cv2.fillPoly(height, [poly], 1.45, cv2.LINE_AA, 4)
            cv2.fillPoly(keepout, [poly], 255, cv2.LINE_AA, 4)
            _disc(keepout, hx, hy, rr + 3 * s, 255)
        else:
            _disc(mask, hx, hy, r_hole, 0)
            _disc(rgb, hx, hy, r_hole + 2 * s, tuple(float(v) * 0.8 for v in col))
    height[mask == 0] = 0.0
    return Surface(rgb, mask, height, keepout)


_TEXT_CHARS = string.ascii_uppercase + string.digits + "-/."


def _label(rng: np.random.Generator, s: float, lw: int, lh: int) -> np.ndarray:
    """A printed label (uint8 drawing, OpenCV text needs 8 bits): header, text lines, barcode."""
    paper = rng.uniform(200, 238)
    img = np.empty((lh, lw, 3), np.uint8)
    img[:] = (paper * rng.uniform(0.9, 1.0), paper, paper * rng.uniform(0.98, 1.02))
    ty = 0.0
    if rng.random() < 0.5:
        header = [(40, 120, 230), (180, 90, 30), (40, 40, 200), (60, 60, 60)][int(rng.integers(4))]
        cv2.rectangle(img, (0, 0), (lw, int(lh * 0.22)), header, -1)
        ty = lh * 0.22
    font_scale = rng.uniform(0.3, 0.42) * s
    line_h = 13 * font_scale / 0.4
    barcode = rng.random() < 0.45
    text_bottom = lh * (0.6 if barcode else 0.95)
    yy = ty + line_h + 2 * s
    ink = int(rng.uniform(20, 50))
    while yy < text_bottom:
        txt = "".join(rng.choice(list(_TEXT_CHARS), int(rng.integers(4, 14))))
        cv2.putText(img, txt, (int(4 * s), int(yy)), cv2.FONT_HERSHEY_SIMPLEX, font_scale,
                    (ink, ink, ink), 1, cv2.LINE_AA)
        yy += line_h * rng.uniform(1.1, 1.4)
    if barcode:
        bx, bx1 = 5 * s, lw * rng.uniform(0.55, 0.9)
        by0, by1 = int(lh * 0.66), int(lh * 0.92)
        unit = max(1, int(round(s)))
        while bx < bx1:
            bw = int(rng.integers(1, 4)) * unit
            cv2.rectangle(img, (int(bx), by0), (int(bx) + bw - 1, by1), (ink, ink, ink), -1)
            bx += bw + int(rng.integers(1, 4)) * unit
    return img.astype(np.float32)



def _casing(rng: np.random.Generator, s: float, size: float) -> Surface:
    pw, ph = size * s, size * s * rng.uniform(0.55, 0.82)
    cw, ch, cx, cy = _canvas(pw, ph, 6 * s)
    x0, y0, x1, y1 = cx - pw / 2, cy - ph / 2, cx + pw / 2, cy + ph / 2
    rc = min(pw, ph) * rng.uniform(0.07, 0.15)
    mask = np.zeros((ch, cw), np.uint8)
    _round_corners(mask, _rect(x0, y0, x1, y1), rc)

    v = rng.uniform(55, 100)
    col = np.array([v * rng.uniform(1.08, 1.25), v, v * rng.uniform(0.85, 0.97)], np.float32)
    grey = 1.0 + 0.03 * _texture("fine", rng, ch, cw)
    rgb = _tinted(grey, col)
    height = (mask > 0).astype(np.float32)
    keepout = np.zeros_like(mask)

    inset = rng.uniform(9, 15) * s
    panel = np.zeros_like(mask)
    _round_corners(panel, _rect(x0 + inset, y0 + inset, x1 - inset, y1 - inset), max(3.0, rc - inset))
    height[panel > 0] = 0.8 if rng.random() < 0.5 else 1.2  # recessed or raised panel

    # Printed label with text lines and maybe a barcode and a coloured header.
    lw, lh = pw * rng.uniform(0.34, 0.55), ph * rng.uniform(0.24, 0.4)
    lx = rng.uniform(x0 + inset + 4 * s, x1 - inset - 4 * s - lw)
    ly = rng.uniform(y0 + inset + 4 * s, y1 - inset - 4 * s - lh)
    rgb[int(ly) : int(ly) + int(lh), int(lx) : int(lx) + int(lw)] = _label(rng, s, int(lw), int(lh))

    # Screws in the corners: metal head, dark rim, cross or slot.
    sr = rng.uniform(5, 8) * s
    cin = max(rc * 0.6, inset * 0.5) + sr * 0.8
    cross = rng.random() < 0.6
    metal = float(rng.uniform(120, 175))
    for sx_, sy_ in ((x0 + cin, y0 + cin), (x1 - cin, y0 + cin), (x0 + cin, y1 - cin), (x1 - cin, y1 - cin)):
        _disc(rgb, sx_, sy_, sr + 1.5 * s, (25, 25, 25))
        _disc(rgb, sx_, sy_, sr, (metal, metal, metal * 0.97))
        _disc(height, sx_, sy_, sr, 1.25)
        _disc(keepout, sx_, sy_, sr + 4 * s, 255)
        t = max(1, int(round(1.5 * s)))
        a = rng.uniform(0, np.pi)
        for aa in ((a, a + np.pi / 2) if cross else (a,)):
            d = 0.75 * sr
            p0, p1 = _pt(sx_ - d * np.cos(aa), sy_ - d * np.sin(aa)), _pt(sx_ + d * np.cos(aa), sy_ + d * np.sin(aa))
            cv2.line(rgb, p0, p1, (30, 30, 30), t, cv2.LINE_AA, 4)
    height[mask == 0] = 0.0
    return Surface(rgb, mask, height, keepout)


_PAINTS = (  # BGR paint colours of covers: signal blue, traffic orange, signal green, RAL yellow
    (150, 80, 20), (20, 95, 215), (60, 135, 40), (20, 170, 220),
)


def _cover(rng: np.random.Generator, s: float, size: float) -> Surface:
    """A painted sheet-metal cover: saturated paint, raised stiffening ribs, a louvre of vent
    slots and two rivets. Not on the default line (issue 6's "product the model never saw");
    its ribs and slots are straight features a scratch detector has never been shown as good."""
    pw, ph = size * s, size * s * rng.uniform(0.5, 0.7)
    cw, ch, cx, cy = _canvas(pw, ph, 6 * s)
    x0, y0, x1, y1 = cx - pw / 2, cy - ph / 2, cx + pw / 2, cy + ph / 2
    mask = np.zeros((ch, cw), np.uint8)
    _round_corners(mask, _rect(x0, y0, x1, y1), rng.uniform(4, 10) * s)

    paint = np.array(_PAINTS[int(rng.integers(len(_PAINTS)))], np.float32) * rng.uniform(0.8, 1.15)
    grey = 1.0 + 0.02 * _texture("mottle", rng, ch, cw)
    if rng.random() < 0.5:
        grey += 0.5 * _specular(rng, ch, cw, pw) / float(paint.mean())
    rgb = _tinted(grey.astype(np.float32), np.clip(paint, 5, 250))
    height = (mask > 0).astype(np.float32)
    keepout = np.zeros_like(mask)

    # Stiffening ribs: long raised bars along the cover, on one side of the louvre.
    n_ribs = int(rng.integers(2, 5))
    rib_w = rng.uniform(5, 9) * s
    louvre_left = rng.random() < 0.5
    rx0 = x0 + pw * (0.5 if louvre_left else 0.12)
    rx1 = x0 + pw * (0.88 if louvre_left else 0.5)
    for k in range(n_ribs):
        ry = y0 + ph * (k + 1) / (n_ribs + 1)
        cv2.line(height, _pt(rx0, ry), _pt(rx1, ry), 1.35, max(1, int(round(rib_w))), cv2.LINE_AA, 4)

    # Louvre: a grid of vent slots through the sheet.
    sx0 = x0 + pw * (0.1 if louvre_left else 0.58)
    slot_w, slot_h = pw * rng.uniform(0.22, 0.3), rng.uniform(3, 5) * s
    rows = int(rng.integers(4, 8))
    for r in range(rows):
        sy = y0 + ph * 0.18 + r * (ph * 0.64) / max(1, rows - 1)
        cv2.line(mask, _pt(sx0, sy), _pt(sx0 + slot_w, sy), 0, max(1, int(round(slot_h))), cv2.LINE_AA, 4)

    # Two rivets on the short sides.
    rr = rng.uniform(4, 6) * s
    for rx in (x0 + 10 * s + rr, x1 - 10 * s - rr):
        _disc(rgb, rx, cy, rr, (200.0, 200.0, 195.0))
        _disc(height, rx, cy, rr, 1.3)
        _disc(keepout, rx, cy, rr + 3 * s, 255)
    height[mask == 0] = 0.0
    return Surface(rgb, mask, height, keepout)


#: Drawer of each product type: ``(rng, scale, size_at_1280) -> Surface``.
PRODUCT_DRAWERS: dict[str, Callable[[np.random.Generator, float, float], Surface]] = {
    "bracket": _bracket,
    "flange": _flange,
    "casing": _casing,
    "cover": _cover,
}


def draw_surface(product: str, rng: np.random.Generator, scale: float, size: float) -> Surface:
    """Draw an unrotated part of ``product`` whose longest side is ``size`` px at 1280 scale."""
    return PRODUCT_DRAWERS[product](rng, scale, size)
