"""The pure rules of adaptive batching: the policy, the AIMD controller, the dispatch bound.

No threads, clocks or models here: every function takes the time it needs as an argument, so the
rules can be tested as tables. :mod:`edge_agent.batcher` runs them; docs/batching.md explains them.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["GPU_PROVIDERS", "AimdController", "BatchPolicy", "LatencyWindow", "plan_dispatch"]

GPU_PROVIDERS = frozenset({"CUDAExecutionProvider", "TensorrtExecutionProvider"})


@dataclass(frozen=True)
class BatchPolicy:
    """The batcher's parameters; docs/batching.md explains each default."""

    slo_ms: float = 100.0  # latency objective per frame, capture -> result
    max_batch: int = 8
    min_batch: int = 1
    initial_batch: int = 1
    max_queue_delay_ms: float = 10.0  # longest wait for a fuller batch once a frame is queued
    increase_step: float = 0.25  # additive increase per full batch within the objective
    decrease_factor: float = 0.9  # multiplicative decrease on a miss (at least one frame less)
    probe_holdoff_s: float = 2.0  # after a miss at size s, s is not tried again for this long ...
    probe_holdoff_max_s: float = 60.0  # ... doubled after each failed retry of s, up to this
    window_s: float = 10.0  # span of the latency / throughput statistics

    def __post_init__(self) -> None:
        if not 1 <= self.min_batch <= self.initial_batch <= self.max_batch:
            raise ValueError(f"need 1 <= min_batch <= initial_batch <= max_batch, got {self}")
        if self.slo_ms <= 0 or self.max_queue_delay_ms < 0 or self.window_s <= 0:
            raise ValueError(f"need slo_ms > 0, max_queue_delay_ms >= 0, window_s > 0, got {self}")
        if self.increase_step <= 0 or not 0 < self.decrease_factor < 1:
            raise ValueError(f"need increase_step > 0 and 0 < decrease_factor < 1, got {self}")

    @classmethod
    def for_provider(cls, provider: str, **overrides: Any) -> BatchPolicy:
        """Defaults for where the model runs: 50 ms / 5 ms queue delay on a GPU, 100 ms / 10 ms on a CPU."""
        gpu = provider in GPU_PROVIDERS
        base: dict[str, Any] = {"slo_ms": 50.0 if gpu else 100.0, "max_queue_delay_ms": 5.0 if gpu else 10.0}
        return cls(**{**base, **overrides})


class AimdController:
    """The batch size: additive increase while every frame meets the objective, multiplicative
    decrease on a miss. Frames captured before the last decrease do not count (they queued under
    the old size), and a size that missed is not retried for ``probe_holdoff_s`` (doubling)."""

    def __init__(self, policy: BatchPolicy) -> None:
        self.policy = policy
        self._b = float(policy.initial_batch)
        self._last_cut = -math.inf
        self._ceiling: int | None = None  # sizes >= this are off limits until _ceiling_until
        self._ceiling_until = 0.0
        self._failed_size: int | None = None
        self._holdoff = policy.probe_holdoff_s
        self.increases = 0
        self.decreases = 0

    @property
    def size(self) -> int:
        return max(self.policy.min_batch, min(self.policy.max_batch, int(self._b)))

    @property
    def value(self) -> float:
        """The controller's continuous state; :attr:`size` is its floor."""
        return self._b

    def update(self, captured: Sequence[float], latencies: Sequence[float], now: float) -> None:
        """One finished batch: each frame's capture time (monotonic) and latency, in seconds."""
        p = self.policy
        fresh = [lat for cap, lat in zip(captured, latencies, strict=True) if cap >= self._last_cut]
        if not fresh:
            return
        if self._ceiling is not None and now >= self._ceiling_until:
            self._ceiling = None
        size, full = self.size, len(latencies) >= self.size
        if max(fresh) > p.slo_ms / 1000:
            if full:  # this size missed: keep away from it for a while, longer each time it misses again
                self._holdoff = min(p.probe_holdoff_max_s, self._holdoff * 2) if size == self._failed_size \
                    else p.probe_holdoff_s
                self._failed_size = self._ceiling = size
                self._ceiling_until = now + self._holdoff
            self._b = max(float(p.min_batch), min(size - 1.0, self._b * p.decrease_factor))
            self._last_cut = now
            self.decreases += 1
        elif full:
            if self._failed_size is not None and size >= self._failed_size:
                self._failed_size, self._holdoff = None, p.probe_holdoff_s
            b = min(float(p.max_batch), self._b + p.increase_step)
            if self._ceiling is not None:
                b = max(float(p.min_batch), min(b, self._ceiling - 1e-6))
            self.increases += int(b > self._b)
            self._b = b


def plan_dispatch(pending: int, target: int, waited: float, oldest_age: float, est_infer: float,
                  policy: BatchPolicy) -> float:
    """Seconds to go on waiting for a fuller batch; 0 means run what is queued now.

    ``pending`` frames are queued; ``target`` is the batch that could be had (the batch size, or
    fewer cameras); the batch has been forming for ``waited`` seconds (since the capture of the
    first frame it saw, even if a newer frame of that camera replaced it since); the oldest frame
    queued now was captured ``oldest_age`` ago; running the batch would take ``est_infer``.
    The wait ends at ``max_queue_delay``, or sooner if waiting longer would make the oldest frame
    miss the objective.
    """
    if pending <= 0:
        return math.inf
    if pending >= target:
        return 0.0
    delay_left = policy.max_queue_delay_ms / 1000 - waited
    slack = policy.slo_ms / 1000 - est_infer - oldest_age
    return max(0.0, min(delay_left, slack))


class LatencyWindow:
    """Timestamped samples over the last ``span`` seconds, with percentiles."""

    def __init__(self, span: float) -> None:
        self.span = span
        self._items: deque[tuple[float, float]] = deque()

    def add(self, now: float, value: float) -> None:
        self._items.append((now, value))
        self.trim(now)

    def trim(self, now: float) -> None:
        while self._items and self._items[0][0] < now - self.span:
            self._items.popleft()

    def values(self) -> list[float]:
        return [v for _, v in self._items]

    def __len__(self) -> int:
        return len(self._items)

    def percentile(self, q: float) -> float:
        """Nearest-rank percentile (``q`` in 0..100) of the samples; nan when there are none."""
        values = sorted(self.values())
        if not values:
            return math.nan
        return values[max(0, math.ceil(q / 100 * len(values)) - 1)]
