"""The payloads of the MQTT contract: one versioned pydantic model per topic kind.

Every message is one UTF-8 JSON object whose ``schema_version`` equals the contract version
that is also in the topic path (``lineguard/v1/...``). Models forbid unknown fields and are
validated strictly (no "0.9" for a float), so any change of fields is a new contract version.

Conventions, fixed for contract v1:

- timestamps (``capture_ts``, ``ts``) are seconds since the Unix epoch, UTC, as a JSON number
  (float, millisecond precision is plenty); values past 2100 are refused, which catches
  milliseconds sent by mistake;
- boxes are ``[x1, y1, x2, y2]`` in the pixels of the original camera frame, as in
  ``results.jsonl``;
- ``image`` is JPEG bytes, base64 (standard alphabet, padded) in JSON;
- ids (site, line, station, camera, agent) follow the topic-level rule of
  :data:`lineguard_contract.topics.SEGMENT_PATTERN`; ``sample_id`` is a lowercase canonical
  UUID and is the idempotency key of a sample end to end.

:func:`encode` and :func:`decode` are the only way bytes are made or read; both refuse
payloads over :data:`MAX_PAYLOAD_BYTES`, and :func:`decode` raises :class:`ContractError`
naming the offending field.
"""

from __future__ import annotations

import base64
import binascii
import uuid
from typing import Annotated, Any, ClassVar, Literal, overload

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    FiniteFloat,
    PlainSerializer,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from lineguard_contract.topics import CONTRACT_VERSION, SEGMENT_PATTERN, StationId

__all__ = [
    "MAX_PAYLOAD_BYTES",
    "MAX_DETECTIONS",
    "ContractError",
    "Detection",
    "SamplePayload",
    "ResultPayload",
    "StatusPayload",
    "HeartbeatPayload",
    "ModelAnnouncePayload",
    "Payload",
    "PAYLOAD_TYPES",
    "encode",
    "decode",
    "new_sample_id",
]

MAX_PAYLOAD_BYTES = 4 * 1024 * 1024  # one encoded message; the broker's limit must be above it
MAX_DETECTIONS = 300  # the detector's max_det
JPEG_MAGIC = b"\xff\xd8\xff"
_TS_MAX = 4_102_444_800.0  # 2100-01-01T00:00:00Z

Id = Annotated[str, StringConstraints(pattern=SEGMENT_PATTERN)]
SampleId = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")]
Version = Annotated[str, StringConstraints(min_length=1, max_length=64)]
Timestamp = Annotated[FiniteFloat, Field(ge=0, lt=_TS_MAX, description="seconds since the epoch, UTC")]
NonNegative = Annotated[FiniteFloat, Field(ge=0)]
Count = Annotated[int, Field(ge=0)]


class ContractError(ValueError):
    """A payload that does not fit the contract. ``field`` is a dotted path, "" for the whole payload."""

    def __init__(self, kind: str, field: str, message: str) -> None:
        self.kind = kind
        self.field = field
        where = f"field '{field}'" if field else "payload"
        super().__init__(f"{kind} payload: {where}: {message}")


def _from_base64(value: object) -> object:
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValueError(f"not valid base64 ({exc})") from exc
    return value


Base64Bytes = Annotated[
    bytes,
    BeforeValidator(_from_base64),
    PlainSerializer(lambda b: base64.b64encode(b).decode("ascii"), return_type=str, when_used="json"),
]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Detection(_Model):
    """One detection, the record of ``results.jsonl``."""

    cls: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    score: Annotated[FiniteFloat, Field(ge=0, le=1)]
    box: Annotated[list[FiniteFloat], Field(min_length=4, max_length=4)]

    @field_validator("box")
    @classmethod
    def _box_ordered(cls, box: list[float]) -> list[float]:
        x1, y1, x2, y2 = box
        if min(box) < 0 or x2 < x1 or y2 < y1:
            raise ValueError(f"box {box} is not [x1, y1, x2, y2] with 0 <= x1 <= x2 and 0 <= y1 <= y2")
        return box


Detections = Annotated[list[Detection], Field(max_length=MAX_DETECTIONS)]


class _Payload(_Model):
    KIND: ClassVar[str]

    schema_version: int = CONTRACT_VERSION

    @field_validator("schema_version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if v != CONTRACT_VERSION:
            raise ValueError(f"schema version {v} is not {CONTRACT_VERSION}, the version this side speaks")
        return v


class SamplePayload(_Payload):
    """A selected frame sent to the hub for review and retraining (``samples``, QoS 1)."""

    KIND: ClassVar[str] = "samples"

    sample_id: SampleId
    site: Id
    line: Id
    station: Id
    camera: Id
    capture_ts: Timestamp
    model_version: Version
    reason: Literal["defect", "uncertain", "random_negative"]
    width: Annotated[int, Field(ge=1, le=16384)]
    height: Annotated[int, Field(ge=1, le=16384)]
    image: Base64Bytes
    detections: Detections

    @field_validator("image")
    @classmethod
    def _is_jpeg(cls, image: bytes) -> bytes:
        if not image.startswith(JPEG_MAGIC):
            raise ValueError(f"not JPEG data (starts with {image[:4]!r}, expected {JPEG_MAGIC!r})")
        return image

    @field_validator("detections")
    @classmethod
    def _inside_frame(cls, dets: list[Detection], info: ValidationInfo) -> list[Detection]:
        w, h = info.data.get("width"), info.data.get("height")
        if w is None or h is None:  # width/height already failed; that error is reported
            return dets
        for i, d in enumerate(dets):
            if d.box[2] > w or d.box[3] > h:
                raise ValueError(f"detection {i}: box {d.box} reaches outside the {w}x{h} frame")
        if info.data.get("reason") == "defect" and not dets:
            raise ValueError("a sample selected as 'defect' must carry at least one detection")
        return dets

    @property
    def station_id(self) -> StationId:
        return StationId(self.site, self.line, self.station)


class ResultPayload(_Payload):
    """Per-frame detections for live views (``results``, QoS 0, may be dropped)."""

    KIND: ClassVar[str] = "results"

    camera: Id
    frame: Count
    pts: NonNegative
    ts: Timestamp
    model_version: Version
    detections: Detections


class StatusPayload(_Payload):
    """Agent presence (``status``, QoS 1, retained). The last will carries ``state="offline"``;
    its ``ts`` is when the will was registered (the uplink's start), not when the agent vanished."""

    KIND: ClassVar[str] = "status"

    agent_id: Id
    state: Literal["online", "offline"]
    model_version: Version
    ts: Timestamp


class HeartbeatPayload(_Payload):
    """Health figures, every few seconds (``heartbeat``, QoS 0). Counters are since agent start."""

    KIND: ClassVar[str] = "heartbeat"

    agent_id: Id
    ts: Timestamp
    model_version: Version
    uptime_s: NonNegative
    fps: NonNegative
    dropped_frames: Count
    batch_size: Count
    latency_p50_ms: NonNegative
    latency_p99_ms: NonNegative
    outbox_depth: Count
    outbox_bytes: Count
    evicted: Count
    #: the agent's split mode (``full``: the whole model on the device); None from agents older than
    #: this field. The hub reads it to know whether its fleet runs split parts at all.
    mode: Literal["full", "split", "auto"] | None = None

    @field_validator("latency_p99_ms")
    @classmethod
    def _p99_above_p50(cls, p99: float, info: ValidationInfo) -> float:
        p50 = info.data.get("latency_p50_ms")
        if p50 is not None and p99 < p50:
            raise ValueError(f"p99 {p99} ms is below p50 {p50} ms")
        return p99


class ModelAnnouncePayload(_Payload):
    """The model version a station should run (``model``, hub -> agent, QoS 1, **retained**, one per
    station; an empty retained message clears it). The agent fetches ``manifest.json``,
    ``manifest.sig`` and the files it needs from ``base_url`` (HTTPS from the hub, resumable), checks
    the manifest against ``manifest_sha256`` and the signature against its provisioned keys, and
    refuses a version older than its own unless ``pinned`` (an admin's rollback)."""

    KIND: ClassVar[str] = "model"

    version: Annotated[str, StringConstraints(pattern=r"^\d+\.\d+\.\d+$")]
    manifest_sha256: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
    base_url: Annotated[str, StringConstraints(pattern=r"^https?://[^\s]+/$", max_length=512)]
    pinned: bool = False
    stage: Literal["canary", "production", "rollback"]
    ts: Timestamp


Payload = SamplePayload | ResultPayload | StatusPayload | HeartbeatPayload | ModelAnnouncePayload
PAYLOAD_TYPES: dict[str, type[_Payload]] = {
    t.KIND: t for t in (SamplePayload, ResultPayload, StatusPayload, HeartbeatPayload, ModelAnnouncePayload)
}


def new_sample_id() -> str:
    """A fresh sample id (random UUID, canonical lowercase form)."""
    return str(uuid.uuid4())


def encode(payload: Payload) -> bytes:
    """The JSON bytes of ``payload``; raises ContractError when they exceed MAX_PAYLOAD_BYTES."""
    data = payload.model_dump_json().encode("utf-8")
    if len(data) > MAX_PAYLOAD_BYTES:
        raise ContractError(payload.KIND, "", f"encodes to {len(data)} bytes, over the {MAX_PAYLOAD_BYTES} limit")
    return data


Wire = bytes | bytearray | memoryview


@overload
def decode(kind: Literal["samples"], data: Wire) -> SamplePayload: ...
@overload
def decode(kind: Literal["results"], data: Wire) -> ResultPayload: ...
@overload
def decode(kind: Literal["status"], data: Wire) -> StatusPayload: ...
@overload
def decode(kind: Literal["heartbeat"], data: Wire) -> HeartbeatPayload: ...
@overload
def decode(kind: Literal["model"], data: Wire) -> ModelAnnouncePayload: ...
@overload
def decode(kind: str, data: Wire) -> Payload: ...


def decode(kind: str, data: Wire) -> Payload:
    """Parse and validate the bytes of a ``kind`` message (a topic kind, e.g. ``"samples"``).

    Raises ContractError naming the first offending field (``schema_version`` first when it
    is among them), for oversized, non-JSON, incomplete or invalid payloads.
    """
    model = PAYLOAD_TYPES.get(kind)
    if model is None:
        raise ContractError(kind, "", f"unknown payload kind; expected one of {sorted(PAYLOAD_TYPES)}")
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ContractError(kind, "", f"expected bytes, got {type(data).__name__}")
    if len(data) > MAX_PAYLOAD_BYTES:
        raise ContractError(kind, "", f"{len(data)} bytes, over the {MAX_PAYLOAD_BYTES} limit")
    try:
        payload = model.model_validate_json(bytes(data))
    except ValidationError as exc:
        raise _contract_error(kind, exc.errors(include_url=False)) from None
    if "schema_version" not in payload.model_fields_set:
        raise ContractError(kind, "schema_version", "missing")
    return payload  # type: ignore[return-value]  # PAYLOAD_TYPES holds only Payload types


def _contract_error(kind: str, errors: list[Any]) -> ContractError:
    errors = sorted(errors, key=lambda e: tuple(e["loc"][:1]) != ("schema_version",))
    first = errors[0]
    field = ".".join(str(p) for p in first["loc"])
    if first["type"] == "json_invalid":
        message = f"not valid JSON ({first['ctx'].get('error', '')})" if first.get("ctx") else "not valid JSON"
    elif first["type"] == "model_type":
        message = "not a JSON object"
    elif first["type"] == "missing":
        message = "missing"
    elif first["type"] == "extra_forbidden":
        message = "not a field of this contract version"
    else:
        message = str(first["msg"]).removeprefix("Value error, ")
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return ContractError(kind, field, message + more)
