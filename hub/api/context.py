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
    #: sessions for GET/HEAD requests, which only read: on SQLite without ``BEGIN IMMEDIATE``, so
    #: that many readers (agents downloading a bundle) do not queue on the write lock
    read_sessions: sessionmaker[Session] | None = None
    metrics: HubMetrics = field(init=False)

    def __post_init__(self) -> None:
        self.metrics = HubMetrics(self.sessions, self.ingest_counters)
