"""The topic tree. Every topic LineGuard publishes or subscribes to is built here.

``lineguard/v{N}/{site}/{line}/{station}/{kind}``: the contract version is part of the path
so that a hub can serve agents of two contract versions during an upgrade.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["CONTRACT_VERSION", "SEGMENT_PATTERN", "Topics", "StationId"]

CONTRACT_VERSION = 1
ROOT = "lineguard"
SEGMENT_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"  # one topic level: also the rule for ids inside payloads
_SEGMENT = re.compile(SEGMENT_PATTERN)


@dataclass(frozen=True)
class StationId:
    """Where a camera station sits: site / line / station. Each part is one topic level."""

    site: str
    line: str
    station: str

    def __post_init__(self) -> None:
        for name in ("site", "line", "station"):
            value = getattr(self, name)
            if not _SEGMENT.match(value):
                raise ValueError(
                    f"{name}={value!r} is not a valid topic level (letters, digits, '_', '.', '-'; 1-64 chars)"
                )


class Topics:
    """Builds topics for one contract version."""

    KINDS = ("samples", "results", "status", "heartbeat", "features", "split_results", "model")

    def __init__(self, version: int = CONTRACT_VERSION) -> None:
        self.prefix = f"{ROOT}/v{version}"

    def station(self, sid: StationId, kind: str) -> str:
        if kind not in self.KINDS:
            raise ValueError(f"unknown topic kind {kind!r}; expected one of {self.KINDS}")
        return f"{self.prefix}/{sid.site}/{sid.line}/{sid.station}/{kind}"

    def all_stations(self, kind: str) -> str:
        """Subscription filter for ``kind`` from every station."""
        if kind not in self.KINDS:
            raise ValueError(f"unknown topic kind {kind!r}; expected one of {self.KINDS}")
        return f"{self.prefix}/+/+/+/{kind}"

    def parse(self, topic: str) -> tuple[StationId, str]:
        """Inverse of :meth:`station`; raises ValueError naming the topic when it does not fit."""
        parts = topic.split("/")
        if len(parts) != 6 or "/".join(parts[:2]) != self.prefix or parts[5] not in self.KINDS:
            raise ValueError(f"topic {topic!r} is not a {self.prefix} station topic")
        return StationId(parts[2], parts[3], parts[4]), parts[5]
