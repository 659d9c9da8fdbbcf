"""Split inference messages: binary feature messages and JSON head results, both directions."""

from __future__ import annotations

import json
import struct
import time

import pytest

from lineguard_contract import ContractError, StationId, Topics
from lineguard_contract.features import (
    FeatureHeader,
    HeadDetection,
    SplitResultPayload,
    decode_features,
    decode_split_result,
    encode_features,
    encode_split_result,
)

HEADER = FeatureHeader(request_id="ab12-7", agent_id="agent-st03", camera="cam0", ts=time.time(),
                       bundle_version="1.1.0", cut=4, channels=16, height=34, width=60, bits=4, codec="zlib",
                       deadline_ms=250.0)
CODES = b"\x78\x9c" + bytes(range(200))


def test_feature_message_round_trip() -> None:
    wire = encode_features(HEADER, CODES)
    header, codes = decode_features(wire)
    assert header == HEADER and codes == CODES
    assert wire.startswith(b"LGF\x01")
    assert len(wire) - len(CODES) < 400  # the header costs a few hundred bytes, not a third of the codes


def _with_header(raw: bytes) -> bytes:
    return struct.pack(">3sBH", b"LGF", 1, len(raw)) + raw + CODES


GOOD_HEAD = HEADER.model_dump_json().encode()


@pytest.mark.parametrize(("data", "field", "text"), [
    (b"", "", "shorter than"),
    (b"XYZ\x01\x00\x02{}", "", "does not start with"),
    (struct.pack(">3sBH", b"LGF", 2, 2) + b"{}" + CODES, "schema_version", "2 is not 1"),
    (struct.pack(">3sBH", b"LGF", 1, 9000) + GOOD_HEAD, "", "runs past"),
    (_with_header(b"not json"), "", "not valid JSON"),
    (_with_header(GOOD_HEAD.replace(b'"bits":4', b'"bits":3')), "bits", "should be 1, 2, 4 or 8"),
    (_with_header(GOOD_HEAD.replace(b'"cut":4', b'"cut":4,"extra":1')), "extra", "not a field"),
    (_with_header(json.dumps({k: v for k, v in json.loads(GOOD_HEAD).items() if k != "bundle_version"}).encode()),
     "bundle_version", "missing"),
    (_with_header(GOOD_HEAD)[: -len(CODES)], "codes", "empty"),
])
def test_malformed_feature_messages_name_the_problem(data: bytes, field: str, text: str) -> None:
    with pytest.raises(ContractError, match=text) as info:
        decode_features(data)
    assert info.value.field == field


def test_result_round_trip_and_refusal_rules() -> None:
    ok = SplitResultPayload(request_id="ab12-7", camera="cam0", bundle_version="1.1.0", status="ok",
                            detections=[HeadDetection(box=[1.0, 2.0, 30.0, 40.0], score=0.9, class_id=2)],
                            hub_ms=12.5)
    assert decode_split_result(encode_split_result(ok)) == ok
    refused = SplitResultPayload(request_id="ab12-7", camera="cam0", bundle_version="0.9.0", status="refused",
                                 reason="no head for bundle version '0.9.0'")
    assert decode_split_result(encode_split_result(refused)) == refused
    with pytest.raises(ValueError, match="refused result has a reason"):
        SplitResultPayload(request_id="x", camera="cam0", bundle_version="1", status="refused")
    with pytest.raises(ContractError, match="status"):
        decode_split_result(encode_split_result(ok).replace(b'"ok"', b'"maybe"'))


def test_topics_for_split() -> None:
    t = Topics()
    sid = StationId("plant1", "line2", "st03")
    assert t.station(sid, "features") == "lineguard/v1/plant1/line2/st03/features"
    assert t.station(sid, "split_results") == "lineguard/v1/plant1/line2/st03/split_results"
    assert t.parse(t.station(sid, "features")) == (sid, "features")
    assert t.all_stations("features") == "lineguard/v1/+/+/+/features"


def test_the_split_results_example_in_docs_protocol_md_decodes() -> None:
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text()
    (text,) = re.findall(r"```json split_results\n(.*?)```", doc, flags=re.S)
    res = decode_split_result(text.encode())
    assert res.status == "ok" and res.detections[0].class_id == 1
