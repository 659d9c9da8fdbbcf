"""The bottleneck's wire codec: lossless round trip, and a clear error for every broken payload."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from models.feature_codec import FeatureDecodeError, FeatureSpec, decode_codes, encode_codes


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("shape", [(16, 34, 60), (3, 5, 7)])  # 3*5*7 = 105: not a multiple of 2, 4 or 8
def test_round_trip_is_exact(bits: int, shape: tuple[int, int, int]) -> None:
    spec = FeatureSpec(cut=4, channels=shape[0], height=shape[1], width=shape[2], bits=bits)
    codes = np.random.default_rng(bits).integers(0, 2**bits, shape, dtype=np.uint8)
    wire = encode_codes(codes, spec)
    out = decode_codes(wire, spec)
    assert out.dtype == np.uint8 and out.shape == shape
    np.testing.assert_array_equal(out, codes)
    assert len(zlib.decompress(wire)) == spec.packed_bytes == -(-codes.size * bits // 8)


def test_packing_is_what_saves_the_bytes() -> None:
    spec = FeatureSpec(cut=4, channels=16, height=34, width=60, bits=4)
    assert spec.packed_bytes == 16 * 34 * 60 // 2


SPEC = FeatureSpec(cut=4, channels=4, height=6, width=8, bits=4)
GOOD = encode_codes(np.arange(4 * 6 * 8, dtype=np.uint8).reshape(4, 6, 8) % 16, SPEC)


@pytest.mark.parametrize(("payload", "error"), [
    (GOOD[: len(GOOD) // 2], "truncated"),
    (b"not zlib at all", "not a zlib stream"),
    (GOOD + b"extra", "after the end"),
    (zlib.compress(b"\x00" * (SPEC.packed_bytes - 1)), "inflates to 95 bytes, expected 96"),
    (zlib.compress(b"\x00" * (SPEC.packed_bytes + 10)), "longer than"),
    (b"", "truncated"),
])
def test_broken_payloads_raise(payload: bytes, error: str) -> None:
    with pytest.raises(FeatureDecodeError, match=error):
        decode_codes(payload, SPEC)


def test_a_payload_for_another_shape_is_refused() -> None:
    other = FeatureSpec(cut=4, channels=8, height=6, width=8, bits=4)
    with pytest.raises(FeatureDecodeError):
        decode_codes(GOOD, other)


@pytest.mark.parametrize(("kwargs", "error"), [
    ({"bits": 3}, "bits must be one of"),
    ({"codec": "lz4"}, "codec must be"),
    ({"channels": 0}, "must be positive"),
])
def test_bad_specs_are_refused(kwargs: dict[str, object], error: str) -> None:
    base = {"cut": 4, "channels": 4, "height": 6, "width": 8, "bits": 4}
    with pytest.raises(ValueError, match=error):
        FeatureSpec(**{**base, **kwargs})  # type: ignore[arg-type]


def test_encode_checks_the_shape() -> None:
    with pytest.raises(ValueError, match="spec says"):
        encode_codes(np.zeros((4, 6, 9), np.uint8), SPEC)


def test_spec_dict_round_trip() -> None:
    assert FeatureSpec.from_dict(SPEC.to_dict()) == SPEC
    with pytest.raises(ValueError, match="missing 'bits'"):
        FeatureSpec.from_dict({"cut": 4, "channels": 4, "height": 6, "width": 8})
