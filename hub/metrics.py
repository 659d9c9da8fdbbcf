"""Prometheus metrics of the hub, on a registry per app (tests build several apps).

- ``lineguard_hub_ingest_messages_total{outcome}``: stored, duplicate, dead_letter, status,
  heartbeat, errors; read from the ingest worker's counters at scrape time.
- ``lineguard_hub_dead_letters`` and ``lineguard_hub_review_queue_depth``: rows in the
  database (dead letters; samples still ``new``), at most every ``db_every_s`` seconds.
- ``lineguard_hub_reviews_total{action}``: review actions made through this process.
- ``lineguard_hub_http_request_seconds{method,route,status}``: request latency by route template.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from hub.tables import DeadLetter, Sample

__all__ = ["HubMetrics"]


class _Pulled(Collector):
    def __init__(self, metrics: HubMetrics) -> None:
        self.m = metrics

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        counters = self.m.ingest_counters() if self.m.ingest_counters else {}
        fam = CounterMetricFamily("lineguard_hub_ingest_messages", "MQTT messages handled by this hub's ingest worker",
                                  labels=["outcome"])
        for outcome, n in sorted(counters.items()):
            fam.add_metric([outcome], n)
        yield fam
        dead, depth = self.m.db_figures()
        yield GaugeMetricFamily("lineguard_hub_dead_letters", "dead-letter rows in the database", value=dead)
        yield GaugeMetricFamily("lineguard_hub_review_queue_depth", "samples waiting for review", value=depth)


class HubMetrics:
    def __init__(self, sessions: sessionmaker[Session],
                 ingest_counters: Callable[[], dict[str, int]] | None = None, db_every_s: float = 10.0) -> None:
        self.sessions = sessions
        self.ingest_counters = ingest_counters
        self.db_every_s = db_every_s
        self._db: tuple[float, int, int] | None = None
        self._lock = threading.Lock()
        self.registry = CollectorRegistry()
        self.reviews = Counter("lineguard_hub_reviews", "review actions", ["action"], registry=self.registry)
        self.requests = Histogram("lineguard_hub_http_request_seconds", "HTTP request latency",
                                  ["method", "route", "status"], registry=self.registry,
                                  buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5))
        self.registry.register(_Pulled(self))

    def db_figures(self) -> tuple[int, int]:
        with self._lock:
            if self._db is not None and time.monotonic() - self._db[0] < self.db_every_s:
                return self._db[1], self._db[2]
        with self.sessions() as s:
            dead = int(s.scalar(select(func.count()).select_from(DeadLetter)) or 0)
            depth = int(s.scalar(select(func.count()).select_from(Sample).where(Sample.status == "new")) or 0)
        with self._lock:
            self._db = (time.monotonic(), dead, depth)
        return dead, depth
