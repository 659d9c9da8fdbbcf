"""The conveyor belt: belt texture with seams and a lane marker, side rails, cached noise tiles.

Everything is drawn in float32 BGR on a 0..255 scale. Sizes are given at 1280x720 scale and
multiplied by ``scale`` (frame width / 1280).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np

__all__ = [
    "BeltStyle",
    "apply_rails",
    "belt_band",
    "belt_strip",
    "noise_crop",
    "noise_tile",
    "sample_belt_style",
]

#: (sigma_x, sigma_y) of the Gaussian that shapes each named noise tile.
_TILE_SIGMAS: dict[str, tuple[float, float]] = {
    "fine": (0.8, 0.8),  # belt grain, plastic matte texture
    "mottle": (14.0, 14.0),  # low-frequency blotches
    "brushed": (18.0, 0.7),  # brushed metal: long streaks along x
}
_TILE_SHAPE = (1152, 2304)


@lru_cache(maxsize=8)
def noise_tile(kind: str) -> np.ndarray:
    """A fixed, periodic, zero-mean unit-variance float32 noise tile (read-only, cached).

    The seed is fixed, so every process (and every dataset seed) sees the same tiles; the
    variety comes from random crop offsets and flips.
    """
    sx, sy = _TILE_SIGMAS[kind]
    rng = np.random.default_rng(zlib.crc32(kind.encode()))
    noise = rng.standard_normal(_TILE_SHAPE, dtype=np.float32)
    pad = int(4 * max(sx, sy)) + 3
    padded = np.pad(noise, pad, mode="wrap")
    tile = cv2.GaussianBlur(padded, (0, 0), sigmaX=sx, sigmaY=sy)[pad:-pad, pad:-pad]
    tile = (tile - tile.mean()) / (tile.std() + 1e-6)
    tile = np.ascontiguousarray(tile, dtype=np.float32)
    tile.setflags(write=False)
    return tile


def noise_crop(kind: str, height: int, width: int, x0: int, y0: int) -> np.ndarray:
    """A ``height x width`` window of a noise tile starting at (x0, y0), wrapping around."""
    tile = noise_tile(kind)
    th, tw = tile.shape
    ys = (np.arange(height) + y0) % th
    xs = (np.arange(width) + x0) % tw
    if ys[-1] >= ys[0] and xs[-1] >= xs[0] and height <= th and width <= tw:
        return tile[ys[0] : ys[0] + height, xs[0] : xs[0] + width]
    return tile[np.ix_(ys, xs)]


@dataclass(frozen=True)
class BeltStyle:
    """Appearance of one conveyor: belt colour and texture, seams, rails, lane marker."""

    base: float  # belt grey level
    tint: tuple[float, float, float]  # BGR multipliers of the belt colour
    fine_amp: float  # amplitude of the fine grain
    mottle_amp: float  # amplitude of low-frequency blotches
    seam_spacing: float  # px at 1280 scale between belt joints
    seam_dark: float  # how much darker a joint is (grey levels)
    rail_top: float  # rail heights, px at 1280 scale
    rail_bottom: float
    rail_level: float  # rail grey level
    lane: bool  # painted dashed lane marker on the belt
    lane_pos: float  # 0..1 across the belt band
    lane_color: tuple[float, float, float]


def sample_belt_style(rng: np.random.Generator, *, video: bool = False) -> BeltStyle:
    """Draw a random belt style. ``video`` lowers the grain so that mp4v files stay small."""
    base = float(rng.uniform(38, 72))
    warm = float(rng.uniform(-0.05, 0.05))
    lane_colors = ((40.0, 190.0, 215.0), (205.0, 210.0, 210.0), (60.0, 120.0, 200.0))
    return BeltStyle(
        base=base,
        tint=(1.0 - warm, 1.0, 1.0 + warm),
        fine_amp=float(rng.uniform(0.4, 0.8) if video else rng.uniform(2.5, 6.0)),
        mottle_amp=float(rng.uniform(0.8, 1.5) if video else rng.uniform(2.0, 6.0)),
        seam_spacing=float(rng.uniform(380, 760)),
        seam_dark=float(rng.uniform(12, 26)),
        rail_top=float(rng.uniform(44, 80)),
        rail_bottom=float(rng.uniform(44, 80)),
        rail_level=float(rng.uniform(95, 165)),
        lane=bool(rng.random() < 0.5),
        lane_pos=float(rng.choice([0.04, 0.96])),
        lane_color=lane_colors[int(rng.integers(len(lane_colors)))],
    )


def belt_band(style: BeltStyle, height: int, scale: float) -> tuple[int, int]:
    """Rows ``[top, bottom)`` of the visible belt between the two rails."""
    return int(round(style.rail_top * scale)), height - int(round(style.rail_bottom * scale))


def belt_strip(
    style: BeltStyle,
    height: int,
    length: int,
    scale: float,
    *,
    tex_offset: tuple[int, int] = (0, 0),
    seam_phase: float = 0.0,
) -> np.ndarray:
    """A float32 BGR belt strip ``height x length`` (no rails) with joints and lane marker.

    Joints sit at ``seam_phase + k * spacing`` (belt coordinates). For a looping belt pass a
    ``length`` that is a multiple of the seam spacing and ``seam_phase=0``: the texture seam at
    the loop point then hides under a joint.
    """
    tx, ty = tex_offset
    grey = cv2.addWeighted(
        noise_crop("fine", height, length, tx, ty), style.fine_amp,
        noise_crop("mottle", height, length, tx, ty), style.mottle_amp, style.base,
    )
    # A faint weave across the belt (fabric carcass showing through the cover).
    grey += (0.03 * style.base) * np.sin(np.arange(length, dtype=np.float32) * (2 * np.pi / (7.0 * scale)))

    spacing = style.seam_spacing * scale
    k0 = int(np.floor(-seam_phase / spacing)) - 1
    for k in range(k0, k0 + int(length / spacing) + 3):
        x = seam_phase + k * spacing
        if -10 * scale < x < length + 10 * scale:
            _draw_seam(grey, x, scale, style.seam_dark)

    top, bottom = belt_band(style, height, scale)
    if style.lane:
        y = top + style.lane_pos * (bottom - top)
        half = 3.0 * scale
        period = spacing / max(1, round(spacing / (70.0 * scale)))
        dash = 0.55 * period
        colour = np.array(style.lane_color, np.float32)
        ys = slice(max(0, int(y - half)), int(y + half) + 1)
        rgb = _tinted(grey, style.tint)
        xs = np.arange(length, dtype=np.float32)
        on = ((xs - seam_phase) % period) < dash
        worn = 0.75 + 0.1 * noise_crop("mottle", ys.stop - ys.start, length, tx + 31, ty + 7)
        rgb[ys][:, on] = (colour[None, None, :] * worn[:, :, None] * (style.base / 55.0))[:, on]
        return rgb
    return _tinted(grey, style.tint)


def _tinted(grey: np.ndarray, tint: tuple[float, float, float] | np.ndarray) -> np.ndarray:
    """3-channel ``grey * tint`` (cv2.merge is much faster than numpy broadcasting here)."""
    return cv2.merge([grey * np.float32(tint[0]), grey * np.float32(tint[1]), grey * np.float32(tint[2])])


def _draw_seam(grey: np.ndarray, x: float, scale: float, dark: float) -> None:
    """A belt joint: a dark groove with a thin bright lip on its trailing side."""
    h, w = grey.shape
    for dx, delta in ((-2.0, -0.5), (-1.0, -1.0), (0.0, -1.0), (1.0, -0.5), (2.5, 0.6)):
        c = int(round(x + dx * scale * 1.2))
        c0, c1 = max(0, c), min(w, c + max(1, int(round(scale))))
        if c0 < c1:
            grey[:, c0:c1] += delta * dark


def apply_rails(frame: np.ndarray, style: BeltStyle, scale: float) -> None:
    """Draw the two static side rails (with rivets) and their shadow onto the belt, in place."""
    h, w = frame.shape[:2]
    top, bottom = belt_band(style, h, scale)
    for y0, y1, belt_side in ((0, top, 1), (bottom, h, -1)):
        rows = y1 - y0
        if rows <= 0:
            continue
        yy = np.linspace(-1.0, 1.0, rows, dtype=np.float32)
        profile = 0.72 + 0.38 * np.exp(-((yy + 0.25) ** 2) / 0.12)  # rounded rail, lit from above
        rail = style.rail_level * profile[:, None] + 5.0 * noise_crop("brushed", rows, w, 300, y0)
        edge = int(round(3 * scale))
        if belt_side > 0:
            rail[-edge:] *= 0.45
        else:
            rail[:edge] *= 0.45
        rail_rgb = _tinted(rail.astype(np.float32), (1.02, 1.0, 0.97))
        # rivets every ~160 px
        pitch = 160.0 * scale
        for cx in np.arange(pitch / 2, w, pitch):
            cy = rows / 2
            r = 5.0 * scale
            cv2.circle(rail_rgb, (int(cx), int(cy)), int(r + 1), (60, 60, 60), -1, cv2.LINE_AA)
            cv2.circle(rail_rgb, (int(cx - r / 4), int(cy - r / 4)), int(r * 0.8),
                       (190, 190, 185), -1, cv2.LINE_AA)
        frame[y0:y1] = rail_rgb
        # soft shadow the rail casts onto the belt
        n = int(round(14 * scale))
        ramp = 1.0 - 0.35 * np.linspace(1.0, 0.0, n, dtype=np.float32) ** 2
        if belt_side > 0:
            frame[top : top + n] *= ramp[:, None, None]
        else:
            frame[bottom - n : bottom] *= ramp[::-1, None, None]
