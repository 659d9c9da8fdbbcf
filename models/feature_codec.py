"""The bottleneck's wire format: quantized feature codes, bit-packed, then zlib (no torch).

The edge part of a split bundle outputs ``uint8`` codes in ``[0, 2**bits - 1]`` of shape
``(C, H, W)`` per frame (:class:`FeatureSpec`). On the wire they are packed ``8 // bits`` to a byte
(bits 1, 2, 4 or 8), row-major, then compressed with zlib: lossless, so the hub decodes exactly the
codes the edge computed. :func:`decode_codes` checks everything it is given (the zlib stream, the
length after inflation, the code range) and raises :class:`FeatureDecodeError`, never returns
garbage: a malformed or truncated message is dead-lettered by the caller.
"""

from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = ["FeatureDecodeError", "FeatureSpec", "decode_codes", "encode_codes"]

_BITS = (1, 2, 4, 8)
_MAX_INFLATE_FACTOR = 1  # the inflated size is known exactly; a zip bomb cannot grow past it


class FeatureDecodeError(ValueError):
    """A feature payload that does not decode to codes of the expected shape and range."""


@dataclass(frozen=True)
class FeatureSpec:
    """What crosses the link for one frame: ``channels x height x width`` codes of ``bits`` bits."""

    cut: int  # the layer after which the model is cut
    channels: int
    height: int
    width: int
    bits: int
    codec: str = "zlib"

    def __post_init__(self) -> None:
        if self.bits not in _BITS:
            raise ValueError(f"bits must be one of {_BITS}, got {self.bits}")
        if self.codec != "zlib":
            raise ValueError(f"codec must be 'zlib', got {self.codec!r}")
        if min(self.channels, self.height, self.width) < 1:
            raise ValueError(f"feature shape must be positive, got {self.shape}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)

    @property
    def values(self) -> int:
        return self.channels * self.height * self.width

    @property
    def packed_bytes(self) -> int:
        """Bytes per frame after bit-packing, before zlib."""
        return -(-self.values * self.bits // 8)

    @property
    def levels(self) -> int:
        return (1 << self.bits) - 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> FeatureSpec:
        try:
            return cls(**{k: raw[k] for k in ("cut", "channels", "height", "width", "bits")},
                       codec=raw.get("codec", "zlib"))
        except KeyError as exc:
            raise ValueError(f"feature spec is missing {exc.args[0]!r}") from None


def encode_codes(codes: np.ndarray, spec: FeatureSpec, level: int = 6) -> bytes:
    """``(C, H, W)`` uint8 codes -> packed, compressed bytes."""
    if codes.shape != spec.shape:
        raise ValueError(f"codes of shape {codes.shape}, the spec says {spec.shape}")
    flat = np.ascontiguousarray(codes, dtype=np.uint8).reshape(-1)
    if spec.bits < 8:
        per = 8 // spec.bits
        pad = (-flat.size) % per
        if pad:
            flat = np.concatenate([flat, np.zeros(pad, np.uint8)])
        groups = flat.reshape(-1, per).astype(np.uint8)
        packed = np.zeros(groups.shape[0], np.uint8)
        for k in range(per):  # first code in the high bits
            packed |= (groups[:, k] & spec.levels) << np.uint8(spec.bits * (per - 1 - k))
        flat = packed
    return zlib.compress(flat.tobytes(), level)


def decode_codes(data: bytes, spec: FeatureSpec) -> np.ndarray:
    """Packed, compressed bytes -> ``(C, H, W)`` uint8 codes, or :class:`FeatureDecodeError`."""
    d = zlib.decompressobj()
    try:
        raw = d.decompress(data, spec.packed_bytes * _MAX_INFLATE_FACTOR)
    except zlib.error as exc:
        raise FeatureDecodeError(f"feature payload is not a zlib stream: {exc}") from None
    if d.unconsumed_tail or not d.eof:
        what = "longer than" if d.unconsumed_tail else "shorter than (truncated?)"
        raise FeatureDecodeError(f"feature payload is {what} {spec.packed_bytes} bytes of {spec.bits}-bit codes "
                                 f"for shape {spec.shape}")
    if d.unused_data:
        raise FeatureDecodeError(f"{len(d.unused_data)} bytes after the end of the zlib stream")
    if len(raw) != spec.packed_bytes:
        raise FeatureDecodeError(f"feature payload inflates to {len(raw)} bytes, expected {spec.packed_bytes} "
                                 f"for shape {spec.shape} at {spec.bits} bits")
    packed = np.frombuffer(raw, np.uint8)
    if spec.bits == 8:
        codes = packed
    else:
        per = 8 // spec.bits
        shifts = np.array([spec.bits * (per - 1 - k) for k in range(per)], np.uint8)
        codes = ((packed[:, None] >> shifts[None, :]) & np.uint8(spec.levels)).reshape(-1)[: spec.values]
    return codes.reshape(spec.shape).copy()
