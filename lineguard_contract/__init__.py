"""The MQTT contract between edge agents and the hub: topics and versioned payloads.

This package is the only place topic strings and payload fields are written. Both sides import it.
"""

from lineguard_contract.connection import BrokerSettings, describe_validation_error
from lineguard_contract.features import (
    FeatureHeader,
    HeadDetection,
    SplitResultPayload,
    decode_features,
    decode_split_result,
    encode_features,
    encode_split_result,
)
from lineguard_contract.payloads import (
    MAX_PAYLOAD_BYTES,
    ContractError,
    Detection,
    HeartbeatPayload,
    ModelAnnouncePayload,
    Payload,
    ResultPayload,
    SamplePayload,
    StatusPayload,
    decode,
    encode,
    new_sample_id,
)
from lineguard_contract.topics import CONTRACT_VERSION, StationId, Topics

__all__ = [
    "BrokerSettings",
    "describe_validation_error",
    "CONTRACT_VERSION",
    "Topics",
    "StationId",
    "MAX_PAYLOAD_BYTES",
    "ContractError",
    "Detection",
    "SamplePayload",
    "ResultPayload",
    "StatusPayload",
    "HeartbeatPayload",
    "ModelAnnouncePayload",
    "Payload",
    "encode",
    "decode",
    "new_sample_id",
    "FeatureHeader",
    "HeadDetection",
    "SplitResultPayload",
    "encode_features",
    "decode_features",
    "encode_split_result",
    "decode_split_result",
]
