"""Which frames leave the station as samples for review and retraining.

Three reasons, in order of priority:

``defect``
    any detection at or above the defect threshold (the bundle's operating threshold by default):
    every alarm is reviewable.
``uncertain``
    otherwise, any detection whose score falls in the uncertain band: the frames a retrain
    learns most from (the decision boundary).
``random_negative``
    otherwise, a small random share of frames with nothing in the band: without them a retrain
    never sees what *not* to alarm on.

A token bucket per camera caps the rate (``max_per_minute``, burst of the same size); a frame
that would exceed it is counted as ``rate_limited`` and not sampled, so a flood of alarms from
one dirty lens cannot fill the outbox.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from models.detections import Detections

__all__ = ["SamplePolicy", "SampleDecision", "Reason"]

Reason = Literal["defect", "uncertain", "random_negative"]


@dataclass(frozen=True)
class SampleDecision:
    reason: Reason | None  # None: not sampled
    rate_limited: bool = False


@dataclass
class _Bucket:
    tokens: float
    stamp: float


@dataclass
class SamplePolicy:
    defect_conf: float
    uncertain_band: tuple[float, float] = (0.05, 0.25)
    negative_rate: float = 0.002
    max_per_minute: float = 30.0
    seed: int | None = None
    clock: Callable[[], float] = time.monotonic
    counts: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        lo, hi = self.uncertain_band
        if not 0 <= lo < hi <= 1:
            raise ValueError(f"uncertain_band must satisfy 0 <= low < high <= 1, got {self.uncertain_band}")
        if not 0 <= self.defect_conf <= 1:
            raise ValueError(f"defect_conf must be in [0, 1], got {self.defect_conf}")
        if self.max_per_minute <= 0:
            raise ValueError(f"max_per_minute must be > 0, got {self.max_per_minute}")
        self._rng = random.Random(self.seed)
        self._buckets: dict[str, _Bucket] = {}

    def classify(self, det: Detections) -> Reason | None:
        """The reason this frame would be sampled, before rate limiting."""
        scores = det.scores
        if len(scores) and float(scores.max()) >= self.defect_conf:
            return "defect"
        lo, hi = self.uncertain_band
        if len(scores) and bool(((scores >= lo) & (scores < hi)).any()):
            return "uncertain"
        if self.negative_rate > 0 and self._rng.random() < self.negative_rate:
            return "random_negative"
        return None

    def _take(self, camera: str) -> bool:
        now = self.clock()
        cap = self.max_per_minute
        b = self._buckets.get(camera)
        if b is None:
            b = self._buckets[camera] = _Bucket(tokens=cap, stamp=now)
        b.tokens = min(cap, b.tokens + (now - b.stamp) * cap / 60.0)
        b.stamp = now
        if b.tokens >= 1.0:
            b.tokens -= 1.0
            return True
        return False

    def decide(self, camera: str, det: Detections) -> SampleDecision:
        reason = self.classify(det)
        if reason is None:
            return SampleDecision(None)
        if not self._take(camera):
            self.counts["rate_limited"] = self.counts.get("rate_limited", 0) + 1
            return SampleDecision(None, rate_limited=True)
        self.counts[reason] = self.counts.get(reason, 0) + 1
        return SampleDecision(reason)
