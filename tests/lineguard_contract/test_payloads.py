import base64
import json
import re
from pathlib import Path
from typing import Any

import pytest

from lineguard_contract import (
    CONTRACT_VERSION,
    MAX_PAYLOAD_BYTES,
    ContractError,
    HeartbeatPayload,
    ResultPayload,
    SamplePayload,
    StationId,
    StatusPayload,
    decode,
    encode,
    new_sample_id,
)

JPEG = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4
SID = "0b5e9d4c-2f0a-4c57-9a43-3f1f0b7c8e21"


def sample_doc(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "schema_version": 1, "sample_id": SID, "site": "plant1", "line": "lineA", "station": "st03",
        "camera": "cam0", "capture_ts": 1767225600.125, "model_version": "1.2.0", "reason": "defect",
        "width": 1920, "height": 1080, "image": base64.b64encode(JPEG).decode(),
        "detections": [{"cls": "scratch", "score": 0.91, "box": [10.5, 20.0, 110.0, 220.25]}],
    }
    for key, value in changes.items():
        if value is ...:
            del doc[key]
        else:
            doc[key] = value
    return doc


def wire(doc: Any) -> bytes:
    return json.dumps(doc).encode()


DOCS = {
    "samples": sample_doc(),
    "results": {"schema_version": 1, "camera": "cam0", "frame": 42, "pts": 1.4, "ts": 1767225600.0,
                "model_version": "1.2.0", "detections": []},
    "status": {"schema_version": 1, "agent_id": "agent-st03", "state": "offline", "model_version": "1.2.0",
               "ts": 1767225600.0},
    "heartbeat": {"schema_version": 1, "agent_id": "agent-st03", "ts": 1767225600.0, "model_version": "1.2.0",
                  "uptime_s": 3600.0, "fps": 29.97, "dropped_frames": 3, "batch_size": 4, "latency_p50_ms": 21.0,
                  "latency_p99_ms": 48.5, "outbox_depth": 7, "outbox_bytes": 2100000, "evicted": 0,
                  "mode": "full"},
}
TYPES = {"samples": SamplePayload, "results": ResultPayload, "status": StatusPayload, "heartbeat": HeartbeatPayload}


@pytest.mark.parametrize("kind", sorted(DOCS))
def test_round_trip_every_kind(kind: str) -> None:
    payload = decode(kind, wire(DOCS[kind]))
    assert type(payload) is TYPES[kind]
    assert payload.schema_version == CONTRACT_VERSION
    again = decode(kind, encode(payload))
    assert again == payload
    assert json.loads(encode(payload)) == json.loads(wire(DOCS[kind]))  # same JSON, field for field


def test_sample_image_is_base64_on_the_wire_and_bytes_in_python() -> None:
    sample = decode("samples", wire(sample_doc()))
    assert sample.image == JPEG
    assert json.loads(encode(sample))["image"] == base64.b64encode(JPEG).decode()
    assert sample.station_id == StationId("plant1", "lineA", "st03")
    built = SamplePayload(**{**sample.model_dump(), "image": JPEG})  # python side takes raw bytes
    assert built == sample


@pytest.mark.parametrize(
    ("changes", "field", "message"),
    [
        ({"sample_id": "not-a-uuid"}, "sample_id", "should match pattern"),
        ({"sample_id": SID.upper()}, "sample_id", "should match pattern"),
        ({"sample_id": ...}, "sample_id", "missing"),
        ({"schema_version": 2}, "schema_version", "schema version 2 is not 1"),
        ({"schema_version": ...}, "schema_version", "missing"),
        ({"schema_version": 2, "future_field": 1}, "schema_version", "(and 1 more problems)"),
        ({"extra": True}, "extra", "not a field of this contract version"),
        ({"site": "a/b"}, "site", "should match pattern"),
        ({"camera": "+"}, "camera", "should match pattern"),
        ({"capture_ts": 1767225600125}, "capture_ts", "less than 4102444800"),
        ({"capture_ts": "2026-01-01T00:00:00Z"}, "capture_ts", "valid number"),
        ({"reason": "boredom"}, "reason", "'defect', 'uncertain' or 'random_negative'"),
        ({"reason": "defect", "detections": []}, "detections", "at least one detection"),
        ({"width": 0}, "width", "greater than or equal to 1"),
        ({"width": "1920"}, "width", "valid integer"),
        ({"image": "***"}, "image", "not valid base64"),
        ({"image": base64.b64encode(b"\x89PNG\r\n").decode()}, "image", "not JPEG data"),
        ({"detections": [{"cls": "scratch", "score": "0.9", "box": [0, 0, 1, 1]}]}, "detections.0.score",
         "valid number"),
        ({"detections": [{"cls": "scratch", "score": 1.5, "box": [0, 0, 1, 1]}]}, "detections.0.score",
         "less than or equal to 1"),
        ({"detections": [{"cls": "scratch", "score": 0.5, "box": [0, 0, 1]}]}, "detections.0.box", "at least 4"),
        ({"detections": [{"cls": "scratch", "score": 0.5, "box": [5, 0, 1, 1]}]}, "detections.0.box",
         "0 <= x1 <= x2"),
        ({"detections": [{"cls": "", "score": 0.5, "box": [0, 0, 1, 1]}]}, "detections.0.cls", "at least 1"),
        ({"detections": [{"cls": "dent", "score": 0.5, "box": [0, 0, 1921, 10]}]}, "detections",
         "outside the 1920x1080 frame"),
        ({"detections": [{"cls": "dent", "score": 0.5, "box": [0, 0, 1, 1], "label": "x"}]},
         "detections.0.label", "not a field"),
    ],
)
def test_malformed_samples_name_the_field(changes: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(ContractError, match=re.escape(message)) as err:
        decode("samples", wire(sample_doc(**changes)))
    assert err.value.field == field
    assert f"field '{field}'" in str(err.value)
    assert err.value.kind == "samples"


@pytest.mark.parametrize(
    ("kind", "data", "message"),
    [
        ("samples", b"{", "not valid JSON"),
        ("samples", b"\xff\xfe\x00", "not valid JSON"),
        ("samples", b"[1, 2]", "not a JSON object"),
        ("samples", b"", "not valid JSON"),
        ("events", b"{}", "unknown payload kind"),
        ("status", b" " * (MAX_PAYLOAD_BYTES + 1), "over the 4194304 limit"),
    ],
)
def test_unreadable_payloads(kind: str, data: bytes, message: str) -> None:
    with pytest.raises(ContractError, match=re.escape(message)) as err:
        decode(kind, data)
    assert err.value.field == ""


@pytest.mark.parametrize(
    ("kind", "changes", "field"),
    [
        ("results", {"frame": -1}, "frame"),
        ("results", {"pts": "1.4"}, "pts"),
        ("results", {"camera": ...}, "camera"),
        ("status", {"state": "sleeping"}, "state"),
        ("status", {"agent_id": "a b"}, "agent_id"),
        ("heartbeat", {"latency_p99_ms": 10.0}, "latency_p99_ms"),  # below p50
        ("heartbeat", {"outbox_depth": -1}, "outbox_depth"),
        ("heartbeat", {"fps": ...}, "fps"),
        ("heartbeat", {"mode": "half"}, "mode"),
    ],
)
def test_malformed_other_kinds(kind: str, changes: dict[str, Any], field: str) -> None:
    doc = dict(DOCS[kind])
    for key, value in changes.items():
        if value is ...:
            del doc[key]
        else:
            doc[key] = value
    with pytest.raises(ContractError) as err:
        decode(kind, wire(doc))
    assert err.value.field == field


def test_encode_refuses_oversized_payload() -> None:
    big = JPEG + b"\x00" * (MAX_PAYLOAD_BYTES * 3 // 4)  # base64 adds a third: over the limit
    sample = SamplePayload(**{**decode("samples", wire(sample_doc())).model_dump(), "image": big})
    with pytest.raises(ContractError, match="over the 4194304 limit"):
        encode(sample)
    ok = SamplePayload(**{**sample.model_dump(), "image": JPEG + b"\x00" * (MAX_PAYLOAD_BYTES // 2)})
    assert len(encode(ok)) < MAX_PAYLOAD_BYTES


def test_models_are_frozen_and_forbid_extra_fields_in_python_too() -> None:
    status = decode("status", wire(DOCS["status"]))
    with pytest.raises(ValueError, match="frozen"):
        status.state = "online"  # type: ignore[misc]
    with pytest.raises(ValueError, match="Extra inputs are not permitted"):
        StatusPayload(**DOCS["status"], colour="red")  # type: ignore[call-arg]


def test_new_sample_ids_are_unique_and_valid() -> None:
    ids = {new_sample_id() for _ in range(1000)}
    assert len(ids) == 1000
    for sid in list(ids)[:10]:
        decode("samples", wire(sample_doc(sample_id=sid)))


def test_the_examples_in_docs_protocol_md_decode() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text()
    blocks = [(k, t) for k, t in re.findall(r"```json (\w+)\n(.*?)```", doc, flags=re.S)
              if k != "split_results"]  # tests/lineguard_contract/test_features.py reads that one
    assert sorted(kind for kind, _ in blocks) == sorted(TYPES)
    for kind, text in blocks:
        assert type(decode(kind, text.encode())) is TYPES[kind]


@pytest.mark.parametrize(("mode", "expected"), [(..., None), ("full", "full"), ("split", "split"), ("auto", "auto")])
def test_heartbeat_mode_is_optional(mode: Any, expected: str | None) -> None:
    """Agents before the field send no ``mode``: still a valid heartbeat, mode None."""
    doc = {k: v for k, v in DOCS["heartbeat"].items() if k != "mode"}
    if mode is not ...:
        doc["mode"] = mode
    msg = decode("heartbeat", wire(doc))
    assert isinstance(msg, HeartbeatPayload) and msg.mode == expected
    assert decode("heartbeat", encode(msg)) == msg
