"""Split inference on the wire: feature messages (agent -> hub) and head results (hub -> agent).

``features`` (QoS 0, not retained; a late frame is worth nothing) is **binary**, because base64 in
JSON would add a third to the very bytes the bottleneck saves::

    b"LGF" | version (1 byte, = CONTRACT_VERSION) | header length (2 bytes, big endian) |
    header (UTF-8 JSON, :class:`FeatureHeader`) | codes (packed and compressed, ``codec``)

The header names the bundle version and the feature spec (cut, shape, bits, codec); the hub
decodes the codes only with the head of exactly that bundle version and spec, and refuses
otherwise (:class:`SplitResultPayload` with ``status="refused"``), never guessing.

``split_results`` (QoS 0) is JSON: per frame, the detections in **model-input pixels** (the agent
knows its own letterbox and maps them back), or a refusal with its reason.
"""

from __future__ import annotations

import struct
from typing import Annotated, ClassVar, Literal

from pydantic import Field, FiniteFloat, StringConstraints, ValidationError, model_validator

from lineguard_contract.payloads import (
    MAX_DETECTIONS,
    MAX_PAYLOAD_BYTES,
    ContractError,
    Count,
    Id,
    NonNegative,
    Timestamp,
    Version,
    _contract_error,
    _Model,
    _Payload,
)
from lineguard_contract.topics import CONTRACT_VERSION

__all__ = ["FEATURE_MAGIC", "FeatureHeader", "HeadDetection", "SplitResultPayload", "decode_features",
           "decode_split_result", "encode_features", "encode_split_result"]

FEATURE_MAGIC = b"LGF"
_PREFIX = struct.Struct(">3sBH")  # magic, contract version, header length
MAX_HEADER_BYTES = 4096
RequestId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.:-]{1,80}$")]
Positive = Annotated[int, Field(ge=1, le=65535)]


class FeatureHeader(_Payload):
    """What the codes after the header are: one frame of one camera, from one bundle's edge part."""

    KIND: ClassVar[str] = "features"

    request_id: RequestId  # unique per frame and agent run; the result echoes it
    agent_id: Id
    camera: Id
    ts: Timestamp  # capture time
    bundle_version: Version
    cut: Count
    channels: Positive
    height: Positive
    width: Positive
    bits: Literal[1, 2, 4, 8]
    codec: Literal["zlib"]
    deadline_ms: Annotated[FiniteFloat, Field(gt=0, le=60_000)]  # after this the agent no longer waits


class HeadDetection(_Model):
    """One detection in model-input pixels: ``[x1, y1, x2, y2]``, score and class index."""

    box: Annotated[list[FiniteFloat], Field(min_length=4, max_length=4)]
    score: Annotated[FiniteFloat, Field(ge=0, le=1)]
    class_id: Count


class SplitResultPayload(_Payload):
    """The head's answer to one feature message."""

    KIND: ClassVar[str] = "split_results"

    request_id: RequestId
    camera: Id
    bundle_version: Version
    status: Literal["ok", "refused"]
    reason: Annotated[str, StringConstraints(max_length=300)] = ""
    detections: Annotated[list[HeadDetection], Field(max_length=MAX_DETECTIONS)] = []
    hub_ms: NonNegative = 0.0  # queueing + decode + head + post-processing at the hub

    @model_validator(mode="after")
    def _refusal_has_reason(self) -> SplitResultPayload:
        if self.status == "refused" and (not self.reason or self.detections):
            raise ValueError("a refused result has a reason and no detections")
        return self


def encode_features(header: FeatureHeader, codes: bytes) -> bytes:
    head = header.model_dump_json().encode("utf-8")
    if len(head) > MAX_HEADER_BYTES:
        raise ContractError("features", "", f"header of {len(head)} bytes, over {MAX_HEADER_BYTES}")
    data = _PREFIX.pack(FEATURE_MAGIC, CONTRACT_VERSION, len(head)) + head + codes
    if len(data) > MAX_PAYLOAD_BYTES:
        raise ContractError("features", "", f"encodes to {len(data)} bytes, over the {MAX_PAYLOAD_BYTES} limit")
    return data


def decode_features(data: bytes | bytearray | memoryview) -> tuple[FeatureHeader, bytes]:
    """``(header, codes)``; ContractError for anything that is not a well-formed feature message.

    The codes are not inflated here (that needs the spec of the bundle's head): a truncated or
    corrupt code stream is found by :func:`models.feature_codec.decode_codes`."""
    data = bytes(data)
    if len(data) > MAX_PAYLOAD_BYTES:
        raise ContractError("features", "", f"{len(data)} bytes, over the {MAX_PAYLOAD_BYTES} limit")
    if len(data) < _PREFIX.size:
        raise ContractError("features", "", f"{len(data)} bytes: shorter than the {_PREFIX.size}-byte prefix")
    magic, version, n = _PREFIX.unpack_from(data)
    if magic != FEATURE_MAGIC:
        raise ContractError("features", "", f"does not start with {FEATURE_MAGIC!r} (got {magic!r})")
    if version != CONTRACT_VERSION:
        raise ContractError("features", "schema_version", f"{version} is not {CONTRACT_VERSION}")
    if n > MAX_HEADER_BYTES or _PREFIX.size + n > len(data):
        raise ContractError("features", "", f"header length {n} runs past the {len(data)}-byte message")
    try:
        header = FeatureHeader.model_validate_json(data[_PREFIX.size:_PREFIX.size + n])
    except ValidationError as exc:
        raise _contract_error("features", exc.errors(include_url=False)) from None
    codes = data[_PREFIX.size + n:]
    if not codes:
        raise ContractError("features", "codes", "empty")
    return header, codes


def encode_split_result(result: SplitResultPayload) -> bytes:
    return result.model_dump_json().encode("utf-8")


def decode_split_result(data: bytes | bytearray | memoryview) -> SplitResultPayload:
    if len(data) > MAX_PAYLOAD_BYTES:
        raise ContractError("split_results", "", f"{len(data)} bytes, over the {MAX_PAYLOAD_BYTES} limit")
    try:
        return SplitResultPayload.model_validate_json(bytes(data))
    except ValidationError as exc:
        raise _contract_error("split_results", exc.errors(include_url=False)) from None
