"""What every request handler needs, built once by ``main`` (or a test) and handed to the app."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy.orm import Session, sessionmaker

from hub.blobs import BlobStore
from hub.core.config import HubConfig
from hub.metrics import HubMetrics

__all__ = ["HubContext"]


@dataclass
class HubContext:
    config: HubConfig
    sessions: sessionmaker[Session]
    blobs: BlobStore
    ingest_counters: Callable[[], dict[str, int]] | None = None
    metrics: HubMetrics = field(init=False)

    def __post_init__(self) -> None:
        self.metrics = HubMetrics(self.sessions, self.ingest_counters)
