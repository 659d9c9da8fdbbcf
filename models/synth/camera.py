"""Camera effects on a whole frame: lighting (gain, colour temperature, vignette/gradient),
motion blur along the belt, Gaussian read noise plus signal-dependent shot noise.

Noise is luminance noise from OpenCV's RNG (much faster than numpy's), seeded explicitly from the caller's
numpy generator so results stay a pure function of the seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import cv2
import numpy as np

__all__ = ["CameraParams", "apply_camera", "drifted", "sample_camera"]


@dataclass(frozen=True)
class CameraParams:
    """Everything the camera does to one frame."""

    gain: float = 1.0
    warmth: float = 0.0  # colour temperature: + warmer (more red, less blue)
    grad: tuple[float, float] = (0.0, 0.0)  # linear brightness slope across x and y
    vignette: float = 0.0  # brightness loss at the frame corners
    center: tuple[float, float] = (0.5, 0.5)  # vignette centre, normalised
    blur: int = 1  # horizontal motion blur kernel length in px (1 = none)
    soften: float = 0.0  # optical softness, Gaussian sigma in px (0 = none)
    read_noise: float = 2.0  # Gaussian noise std, grey levels
    shot_noise: float = 0.2  # shot noise std = shot_noise * sqrt(level)
    jpeg_quality: int = 90


def sample_camera(rng: np.random.Generator, scale: float) -> CameraParams:
    """Random camera for an independent dataset image."""
    blur = int(rng.choice([1, 1, 2, 3, 3, 4, 5, 6, 7, 9]))
    return CameraParams(
        gain=float(rng.uniform(0.8, 1.2)),
        warmth=float(rng.uniform(-1, 1)),
        grad=(float(rng.uniform(-0.18, 0.18)), float(rng.uniform(-0.12, 0.12))),
        vignette=float(rng.uniform(0.0, 0.35)),
        center=(float(rng.uniform(0.3, 0.7)), float(rng.uniform(0.3, 0.7))),
        blur=max(1, int(round(blur * scale))) if blur > 1 else 1,
        read_noise=float(rng.uniform(1.0, 4.0)),
        shot_noise=float(rng.uniform(0.0, 0.35)),
        jpeg_quality=int(rng.integers(45, 96)),
    )


def drifted(base: CameraParams, t: float, phases: np.ndarray) -> CameraParams:
    """``base`` with slow lighting drift at time ``t`` seconds (``phases``: 6 random numbers)."""
    p = phases
    return replace(
        base,
        gain=base.gain * (1.0 + 0.06 * math.sin(2 * math.pi * t / (7.0 + 4 * p[0]) + 6.3 * p[1])),
        warmth=base.warmth + 0.35 * math.sin(2 * math.pi * t / (11.0 + 6 * p[2]) + 6.3 * p[3]),
        center=(
            base.center[0] + 0.12 * math.sin(2 * math.pi * t / (9.0 + 5 * p[4])),
            base.center[1] + 0.08 * math.cos(2 * math.pi * t / (13.0 + 5 * p[5])),
        ),
    )


def _field(params: CameraParams, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Separable lighting field: ``gain(y, x) = fy[y] * fx[x]``."""
    xs = np.linspace(0.0, 1.0, width, dtype=np.float32)
    ys = np.linspace(0.0, 1.0, height, dtype=np.float32)
    v = params.vignette
    fx = (1.0 + params.grad[0] * (xs - 0.5)) * (1.0 - v * (xs - params.center[0]) ** 2 * 1.6)
    fy = (1.0 + params.grad[1] * (ys - 0.5)) * (1.0 - v * (ys - params.center[1]) ** 2 * 1.6)
    return fy.astype(np.float32), fx.astype(np.float32)


def apply_camera(img: np.ndarray, params: CameraParams, rng: np.random.Generator) -> np.ndarray:
    """Apply lighting, motion blur and sensor noise to float32 BGR ``img`` (modified in place)
    and return the uint8 frame."""
    h, w = img.shape[:2]
    fy, fx = _field(params, h, w)
    wb = np.array([1.0 - 0.07 * params.warmth, 1.0, 1.0 + 0.07 * params.warmth], np.float32)
    field = np.outer(fy, fx)
    g: np.ndarray = wb * params.gain  # reused below for the Gaussian kernel
    img *= cv2.merge([field * g[0], field * g[1], field * g[2]])
    if params.blur > 1 or params.soften > 0:
        kx = np.full(params.blur, 1.0 / params.blur, np.float32)
        ky: np.ndarray = np.ones(1, np.float32)
        if params.soften > 0:
            g = cv2.getGaussianKernel(2 * int(np.ceil(3 * params.soften)) + 1, params.soften, cv2.CV_32F).ravel()
            kx, ky = np.convolve(kx, g).astype(np.float32), g
        img = cv2.sepFilter2D(img, -1, kx[None, :], ky[:, None], borderType=cv2.BORDER_REPLICATE)
    # Luminance noise (what survives demosaicing and denoising in a real ISP), shot part
    # proportional to sqrt(level); cv2.add rounds and saturates straight into uint8.
    cv2.setRNGSeed(int(rng.integers(0, 2**31 - 1)))
    noise = np.empty((h, w), np.float32)
    # cv2 stubs type mean/stddev as arrays only; the binding also takes (and documents) scalars.
    cv2.randn(noise, 0.0, 1.0)  # type: ignore[call-overload]
    if params.shot_noise > 0:
        std: np.ndarray = cv2.sqrt(np.maximum(cv2.cvtColor(img, cv2.COLOR_BGR2GRAY), 0.0))
        std *= params.shot_noise
        std += params.read_noise
        noise *= std
    else:
        noise *= params.read_noise
    return cv2.add(img, cv2.merge([noise, noise, noise]), dtype=cv2.CV_8U)
