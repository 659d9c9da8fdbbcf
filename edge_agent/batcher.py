"""Adaptive batching of the newest frames of all the agent's cameras into one detector.

Each live source holds at most one frame (the newest), so a batch takes at most one frame per
camera, oldest first. How many it takes is set by an AIMD controller on the measured latency
from capture to result (Clipper, NSDI'17): grow the batch size by a small step after each full
batch whose frames all met the objective, cut it by 10 % (at least one frame) after a batch
that missed it. How long it waits for a fuller batch is bounded Triton-style by
``max_queue_delay`` and by what is left of the objective. docs/batching.md has the rules, the
defaults and why.

The rules (:class:`AimdController`, :func:`plan_dispatch`) live in :mod:`edge_agent.batch_policy`, pure and
testable without a model or threads; :class:`AdaptiveBatcher` runs them against live sources and a
:class:`Detector`. Import everything from here.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from edge_agent.batch_policy import AimdController, BatchPolicy, LatencyWindow, plan_dispatch
from edge_agent.detector import Detector
from edge_agent.source_api import Frame, Source, SourceState
from models.detections import Detections

__all__ = [
    "AdaptiveBatcher",
    "AimdController",
    "BatchPolicy",
    "BatcherStats",
    "LatencyWindow",
    "Result",
    "plan_dispatch",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Result:
    frame: Frame
    detections: Detections
    latency_s: float  # capture -> result
    queued_s: float  # capture -> handed to the detector
    batch_size: int
    batch_id: int


@dataclass(frozen=True)
class BatcherStats:
    batch_size: int  # the controller's current size
    last_batch: int  # frames in the last batch run
    batches: int
    frames: int  # frames processed, all time
    infer_ms_last: float
    infer_ms_p50: float  # per batch, over the window
    infer_ms_by_size: dict[int, float]  # moving average per batch size
    latency_p50_ms: float  # capture -> result, over the window
    latency_p99_ms: float
    latency_samples: int
    fps: float  # frames processed per second over the window
    queue_depth: int  # cameras with a frame waiting now
    slo_ms: float
    slo_misses: int  # frames over the objective, all time
    increases: int
    decreases: int
    detector_errors: int
    frames_failed: int  # frames lost to detector errors

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _InferModel:
    """Moving average of the detector's time per batch size, extrapolated per frame."""

    alpha: float = 0.3
    by_size: dict[int, float] = field(default_factory=dict)

    def add(self, size: int, seconds: float) -> None:
        old = self.by_size.get(size)
        self.by_size[size] = seconds if old is None else old + self.alpha * (seconds - old)

    def estimate(self, size: int) -> float:
        if size in self.by_size:
            return self.by_size[size]
        if not self.by_size:
            return 0.0
        near = min(self.by_size, key=lambda s: abs(s - size))
        return self.by_size[near] * size / near


class AdaptiveBatcher:
    """Feeds ``detector`` (loaded) with batches of the newest frames of ``sources`` (started by the caller).

    :meth:`start` runs it in a thread, :meth:`step` runs one batch in the caller's; results go to
    ``on_results`` (in the batcher's thread, in order: never reordered within a camera) and come
    back from :meth:`step`.
    """

    def __init__(self, detector: Detector, sources: Iterable[Source] = (), *, policy: BatchPolicy | None = None,
                 on_results: Callable[[list[Result]], None] | None = None) -> None:
        self.detector = detector
        self.policy = policy or BatchPolicy()
        self.controller = AimdController(self.policy)
        self.on_results = on_results
        self._cond = threading.Condition()
        self._stats_lock = threading.Lock()  # the windows are written by the batcher, read by anyone
        self._sources: list[Source] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._infer = _InferModel()
        self._latency = LatencyWindow(self.policy.window_s)
        self._batch_log = LatencyWindow(self.policy.window_s)  # (done, infer seconds)
        self._frame_log = LatencyWindow(self.policy.window_s)  # (done, frames in the batch)
        self._t0 = time.monotonic()
        self._batches = self._frames = self._misses = self._errors = self._failed = 0
        self._last_batch = 0
        self._infer_last = math.nan
        self._warned_at = -math.inf
        for source in sources:
            self.add_source(source)

    # ---- sources ----------------------------------------------------------------------------
    def add_source(self, source: Source) -> None:
        source.add_listener(self._wake)
        with self._cond:
            self._sources = [*self._sources, source]
            self._cond.notify_all()

    def remove_source(self, camera_id: str) -> Source | None:
        with self._cond:
            found = next((s for s in self._sources if s.camera_id == camera_id), None)
            self._sources = [s for s in self._sources if s is not found]
        return found

    @property
    def sources(self) -> list[Source]:
        return list(self._sources)

    @property
    def batch_size(self) -> int:
        return self.controller.size

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    # ---- running ----------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._loop, name="batcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.step(timeout=0.2)

    def _collect(self, timeout: float | None) -> list[Frame]:
        """Wait for frames and for a full enough batch; take the oldest ``size`` of them."""
        deadline = None if timeout is None else time.monotonic() + timeout
        forming_since: float | None = None  # capture of the first frame seen queued for this batch
        with self._cond:
            while not self._stop.is_set():
                now = time.monotonic()
                sources = self._sources
                pending = [(s, f) for s in sources if (f := s.peek()) is not None]
                if pending:
                    reachable = sum(1 for s in sources if s.state is SourceState.RUNNING or s.peek() is not None)
                    target = max(1, min(self.controller.size, reachable))
                    oldest = min(f.capture_mono for _, f in pending)
                    forming_since = oldest if forming_since is None else min(forming_since, oldest)
                    wait = plan_dispatch(len(pending), target, now - forming_since, now - oldest,
                                         self._infer.estimate(target), self.policy)
                    if wait <= 0:
                        break
                else:
                    if deadline is not None and now >= deadline:
                        return []
                    wait = 0.1 if deadline is None else min(0.1, deadline - now)
                self._cond.wait(wait)
            else:
                return []
            pending.sort(key=lambda sf: sf[1].capture_mono)
            taken = [s.take() for s, _ in pending[: self.controller.size]]
        return sorted((f for f in taken if f is not None), key=lambda f: f.capture_mono)

    def step(self, timeout: float | None = None) -> list[Result]:
        """Form and run one batch; [] when no frame came within ``timeout`` (None: wait on)."""
        frames = self._collect(timeout)
        if not frames:
            return []
        start = time.monotonic()
        try:
            if all(f.prepared is not None for f in frames):  # letterboxed in the capture threads
                detections = self.detector.detect_prepared([f.prepared for f in frames])
            else:
                detections = self.detector.detect([f.image for f in frames])
            if len(detections) != len(frames):
                raise RuntimeError(f"detector returned {len(detections)} results for {len(frames)} frames")
        except Exception:
            self._errors += 1
            self._failed += len(frames)
            log.exception("detector failed on a batch of %d frames (%d errors so far); frames dropped",
                          len(frames), self._errors)
            self._stop.wait(0.05)  # a broken model must not spin the loop
            return []
        done = time.monotonic()
        results = [Result(f, d, done - f.capture_mono, start - f.capture_mono, len(frames), self._batches + 1)
                   for f, d in zip(frames, detections, strict=True)]
        with self._stats_lock:
            self._account(results, done - start, done)
        if self.on_results is not None:
            try:
                self.on_results(results)
            except Exception:  # the consumer's bug must not stop inference
                log.exception("on_results failed")
        return results

    def _account(self, results: list[Result], infer_s: float, now: float) -> None:
        n = len(results)
        self._batches += 1
        self._infer.add(n, infer_s)
        self._infer_last = infer_s
        self._last_batch = n
        self._frames += n
        slo = self.policy.slo_ms / 1000
        self._misses += sum(r.latency_s > slo for r in results)
        self._batch_log.add(now, infer_s)
        self._frame_log.add(now, float(n))
        for r in results:
            self._latency.add(now, r.latency_s)
        self.controller.update([r.frame.capture_mono for r in results], [r.latency_s for r in results], now)
        if (self.controller.size == self.policy.min_batch and max(r.latency_s for r in results) > slo
                and now - self._warned_at > 30):
            self._warned_at = now
            log.warning("latency objective %.0f ms missed at the smallest batch (%d): p99 %.0f ms over %.0f s; "
                        "the detector is too slow for this load on this machine", self.policy.slo_ms,
                        self.policy.min_batch, 1000 * self._latency.percentile(99), self.policy.window_s)

    # ---- reporting --------------------------------------------------------------------------
    def latencies(self) -> list[float]:
        """Capture -> result latencies (seconds) of the frames in the window, oldest first."""
        with self._stats_lock:
            self._latency.trim(time.monotonic())
            return self._latency.values()

    def stats(self) -> BatcherStats:
        with self._stats_lock:
            return self._stats(time.monotonic())

    def _stats(self, now: float) -> BatcherStats:
        for window in (self._latency, self._batch_log, self._frame_log):
            window.trim(now)
        span = min(self.policy.window_s, max(now - self._t0, 1e-6))
        return BatcherStats(
            batch_size=self.controller.size, last_batch=self._last_batch, batches=self._batches,
            frames=self._frames, infer_ms_last=round(1000 * self._infer_last, 2),
            infer_ms_p50=round(1000 * self._batch_log.percentile(50), 2),
            infer_ms_by_size={k: round(1000 * v, 2) for k, v in sorted(self._infer.by_size.items())},
            latency_p50_ms=round(1000 * self._latency.percentile(50), 2),
            latency_p99_ms=round(1000 * self._latency.percentile(99), 2), latency_samples=len(self._latency),
            fps=round(sum(self._frame_log.values()) / span, 2),
            queue_depth=sum(1 for s in self._sources if s.peek() is not None), slo_ms=self.policy.slo_ms,
            slo_misses=self._misses, increases=self.controller.increases, decreases=self.controller.decreases,
            detector_errors=self._errors, frames_failed=self._failed,
        )
