"""Adaptive batching: the AIMD rules and the dispatch bound as tables, then live runs against a fake
detector whose time per batch is ``a + b * n`` and synthetic cameras paced at their frame rate."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Sequence
from statistics import median
from typing import Any

import numpy as np
import pytest

from edge_agent.batcher import AdaptiveBatcher, AimdController, BatchPolicy, LatencyWindow, Result, plan_dispatch
from edge_agent.capture import LiveSource
from edge_agent.detector import Detector
from models.detections import Detections

# ---- the controller, step by step -------------------------------------------------------------

# A step is (time s, frames in the batch or "full" for the current size, worst latency ms, age of
# the frames' capture in ms before the batch ended: defaults to the latency).
SCENARIOS: dict[str, tuple[dict[str, Any], list[tuple[Any, ...]], list[int]]] = {
    "grows one step per full batch within the objective": (
        dict(initial_batch=1, increase_step=0.5),
        [(t, "full", 40) for t in range(1, 7)],
        [1, 2, 2, 3, 3, 4],
    ),
    "holds while batches are not full (no load to grow into)": (
        dict(initial_batch=2, increase_step=1.0),
        [(1, 1, 40), (2, 1, 40), (3, 2, 40), (4, 1, 40)],
        [2, 2, 3, 3],
    ),
    "cuts at least one frame on a miss": (
        dict(initial_batch=8, max_batch=8),
        [(1, "full", 140), (2, "full", 140), (3, "full", 140)],
        [7, 6, 5],
    ),
    "cuts 10 % of a large batch on a miss": (
        dict(initial_batch=30, max_batch=32),
        [(1, "full", 140), (2, "full", 140)],
        [27, 24],
    ),
    "a partial batch that misses cuts too": (
        dict(initial_batch=6),
        [(1, 2, 140)],
        [5],
    ),
    "frames captured before the last cut do not cut again": (
        dict(initial_batch=6),
        [(1.0, "full", 140), (1.1, "full", 180, 180), (1.3, "full", 150, 150)],
        [5, 5, 4],  # 1.1: captured at 0.92 < 1.0, ignored; 1.3: captured at 1.15, counts
    ),
    "a size that missed is not retried before the holdoff": (
        dict(initial_batch=3, increase_step=1.0, probe_holdoff_s=2.0),
        [(1, "full", 140), (2, "full", 40), (2.5, "full", 40), (3.5, "full", 40)],
        [2, 2, 2, 3],  # missed at 3 at t=1: capped at 2 until t=3
    ),
    "the holdoff doubles when the retried size misses again": (
        dict(initial_batch=3, increase_step=1.0, probe_holdoff_s=1.0),
        [(1, "full", 140), (2.5, "full", 40), (3, "full", 140), (4.5, "full", 40), (5.5, "full", 40)],
        [2, 3, 2, 2, 3],  # 3 missed again at t=3: the next retry waits 2 s, until t=5
    ),
    "stays within min and max": (
        dict(initial_batch=2, min_batch=2, max_batch=3, increase_step=1.0),
        [(1, "full", 40), (2, "full", 40), (3, "full", 140), (4, "full", 140)],
        [3, 3, 2, 2],
    ),
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_aimd_controller(name: str) -> None:
    overrides, steps, sizes = SCENARIOS[name]
    ctrl = AimdController(BatchPolicy(slo_ms=100.0, **overrides))
    got = []
    for now, fill, worst_ms, *age in steps:
        n = ctrl.size if fill == "full" else int(fill)
        latencies = [worst_ms / 1000 * 0.5] * (n - 1) + [worst_ms / 1000]
        captured = [now - (age[0] if age else worst_ms) / 1000] * n
        ctrl.update(captured, latencies, float(now))
        got.append(ctrl.size)
    assert got == sizes


@pytest.mark.parametrize(
    ("pending", "target", "waited_ms", "oldest_ms", "est_ms", "wait_ms"),
    [
        (0, 4, 0, 0, 0, math.inf),  # nothing queued: wait for a frame
        (4, 4, 0, 0, 20, 0),  # a full batch goes at once
        (1, 1, 0, 0, 20, 0),  # a lone stream never waits for company
        (1, 4, 0, 0, 20, 10),  # wait up to max_queue_delay for more ...
        (1, 4, 6, 6, 20, 4),  # ... counted from the first frame's arrival
        (1, 4, 8, 2, 20, 2),  # ... even when a newer frame of its camera replaced it
        (3, 4, 12, 12, 20, 0),  # delay spent: run the 3 there are
        (1, 4, 0, 0, 95, 5),  # less left of the objective than max_queue_delay
        (1, 4, 2, 90, 5, 5),  # the oldest frame is late already: only its slack is left
        (2, 4, 0, 0, 120, 0),  # the objective cannot be met anyway: no wait at all
    ],
)
def test_plan_dispatch(pending: int, target: int, waited_ms: float, oldest_ms: float, est_ms: float,
                       wait_ms: float) -> None:
    policy = BatchPolicy(slo_ms=100.0, max_queue_delay_ms=10.0)
    got = plan_dispatch(pending, target, waited_ms / 1000, oldest_ms / 1000, est_ms / 1000, policy)
    assert 1000 * got == pytest.approx(wait_ms)


@pytest.mark.parametrize(
    ("samples", "q", "expected"),
    [
        ([], 50, math.nan),
        ([5.0], 99, 5.0),
        ([1.0, 2.0, 3.0, 4.0], 50, 2.0),
        (list(range(1, 101)), 99, 99),
        (list(range(1, 101)), 100, 100),
        (list(range(1, 201)), 99, 198),
    ],
)
def test_latency_window_percentiles(samples: list[float], q: float, expected: float) -> None:
    window = LatencyWindow(span=10.0)
    for v in samples:
        window.add(1.0, float(v))
    got = window.percentile(q)
    assert (math.isnan(got) and math.isnan(expected)) or got == expected


def test_latency_window_forgets_old_samples() -> None:
    window = LatencyWindow(span=2.0)
    for t in range(6):
        window.add(float(t), 10.0 * t)
    assert window.values() == [30.0, 40.0, 50.0] and window.percentile(50) == 40.0


@pytest.mark.parametrize(
    ("provider", "slo_ms", "delay_ms"),
    [("CPUExecutionProvider", 100.0, 10.0), ("CUDAExecutionProvider", 50.0, 5.0),
     ("TensorrtExecutionProvider", 50.0, 5.0)],
)
def test_policy_defaults_follow_the_provider(provider: str, slo_ms: float, delay_ms: float) -> None:
    policy = BatchPolicy.for_provider(provider)
    assert (policy.slo_ms, policy.max_queue_delay_ms) == (slo_ms, delay_ms)
    assert BatchPolicy.for_provider(provider, slo_ms=70.0).slo_ms == 70.0


@pytest.mark.parametrize("bad", [dict(min_batch=0), dict(initial_batch=9), dict(min_batch=3, initial_batch=2),
                                 dict(slo_ms=0), dict(decrease_factor=1.0), dict(increase_step=0)])
def test_policy_rejects_nonsense(bad: dict) -> None:
    with pytest.raises(ValueError):
        BatchPolicy(**bad)


# ---- live runs ------------------------------------------------------------------------------


class FakeDetector(Detector):
    """Sleeps ``a + b * n`` seconds per batch of ``n``; records what it saw."""

    classes = ["scratch"]
    input_size = (8, 8)
    version = "fake"

    def __init__(self, a: float, b: float, fail_on: Sequence[int] = ()) -> None:
        self.a, self.b = a, b
        self.fail_on = set(fail_on)
        self.calls = 0

    def load(self) -> None:
        pass

    def detect(self, frames: Sequence[np.ndarray]) -> list[Detections]:
        self.calls += 1
        time.sleep(self.a + self.b * len(frames))
        if self.calls in self.fail_on:
            raise RuntimeError("out of device memory")
        return [Detections.empty() for _ in frames]


class _Endless:
    def isOpened(self) -> bool:  # noqa: N802
        return True

    def read(self) -> tuple[bool, np.ndarray]:
        return True, np.zeros((8, 8, 3), np.uint8)

    def get(self, prop: int, /) -> float:
        return 0.0

    def release(self) -> None:
        pass


def cameras(*fps: float) -> list[LiveSource]:
    sources = [LiveSource(f"cam{i}", _Endless, pace=rate) for i, rate in enumerate(fps)]
    for s in sources:
        s.start()
    return sources


class Run:
    """A batcher in its thread over ``sources``, collecting results."""

    def __init__(self, detector: Detector, sources: list[LiveSource], **policy: Any) -> None:
        self.sources = sources
        self.results: list[Result] = []
        self.batches: list[list[Result]] = []
        self.batcher = AdaptiveBatcher(detector, sources, policy=BatchPolicy(**policy), on_results=self._collect)

    def _collect(self, results: list[Result]) -> None:
        self.batches.append(results)
        self.results.extend(results)

    def __enter__(self) -> Run:
        self.batcher.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.batcher.stop()
        for s in self.sources:
            s.close()

    def wait_for(self, condition: object, timeout: float) -> None:
        end = time.monotonic() + timeout
        while not condition():  # type: ignore[operator]
            assert time.monotonic() < end, f"not met in {timeout} s: {self.batcher.stats()}"
            time.sleep(0.02)


def test_batch_follows_the_load_growing_then_shrinking_on_misses_then_growing_again() -> None:
    detector = FakeDetector(a=0.010, b=0.002)  # 6 frames: 22 ms, far inside 100 ms
    # A queue delay longer than a frame period (33 ms) lets a batch take one frame of every camera
    # whatever their phases: on a loaded machine a camera whose reads fall a period behind restarts
    # its schedule, and with the default 10 ms cameras spread over the period never fill a batch of 6.
    with Run(detector, cameras(*[30.0] * 6), slo_ms=100.0, max_queue_delay_ms=40.0, probe_holdoff_s=0.5,
             probe_holdoff_max_s=1.0) as run:
        run.wait_for(lambda: run.batcher.batch_size >= 6 and len(run.batches[-1]) == 6, timeout=20)
        grown = run.batcher.stats()
        n = len(run.results)
        detector.b = 0.030  # the model slows down: 6 frames now take 190 ms
        run.wait_for(lambda: run.batcher.batch_size <= 2, timeout=20)
        shrunk = run.batcher.stats()
        late = run.results[n:]
        detector.b = 0.002
        run.wait_for(lambda: run.batcher.batch_size >= 6, timeout=20)
    assert max(len(b) for b in run.batches) == 6  # never more than one frame per camera
    assert grown.increases >= 5 and grown.latency_p50_ms < 100 and grown.fps > 100
    assert shrunk.decreases >= 4 and shrunk.slo_misses > 0
    assert any(r.latency_s > 0.1 for r in late)  # the misses that drove it down were real


def test_results_are_never_reordered_within_a_camera() -> None:
    rng = np.random.default_rng(0)

    class Jittery(FakeDetector):
        def detect(self, frames: Sequence[np.ndarray]) -> list[Detections]:
            self.a = float(rng.uniform(0.0, 0.03))
            return super().detect(frames)

    with Run(Jittery(0.0, 0.004), cameras(30.0, 25.0, 60.0, 10.0), slo_ms=60.0, probe_holdoff_s=0.2) as run:
        run.wait_for(lambda: len(run.results) >= 120, timeout=20)
    by_camera: dict[str, list[int]] = {}
    for r in run.results:
        by_camera.setdefault(r.frame.camera_id, []).append(r.frame.index)
    assert set(by_camera) == {"cam0", "cam1", "cam2", "cam3"}
    for indices in by_camera.values():
        assert indices == sorted(set(indices))
    for batch in run.batches:
        assert len({r.frame.camera_id for r in batch}) == len(batch)
        assert [r.frame.capture_mono for r in batch] == sorted(r.frame.capture_mono for r in batch)
    sizes = {len(b) for b in run.batches}
    assert len(sizes) > 1  # the run did mix batch sizes


@pytest.mark.parametrize(
    ("fps", "delay_ms", "max_queued_ms", "max_gap_ms", "min_gap_ms"),
    [
        ((30.0,), 300.0, 30.0, 70.0, None),  # a lone stream never waits for a batch, whatever the delay
        ((30.0, 2.0), 20.0, 50.0, 80.0, None),  # a slow second camera holds the first ~20 ms at most
        ((30.0, 2.0), 300.0, None, None, 200.0),  # the contrast: with a long delay it holds it up to 300 ms
    ],
    ids=["lone stream", "bounded by max_queue_delay", "long delay holds it"],
)
def test_queue_delay_bounds_how_long_a_camera_waits_for_company(
    fps: tuple[float, ...], delay_ms: float, max_queued_ms: float | None, max_gap_ms: float | None,
    min_gap_ms: float | None,
) -> None:
    """Waiting shows in the first camera's results as queueing time and as gaps between results
    (while it waits, newer frames replace the queued one: fewer results, not older ones)."""
    with Run(FakeDetector(0.005, 0.001), cameras(*fps), slo_ms=1000.0, initial_batch=4,
             max_queue_delay_ms=delay_ms) as run:
        run.wait_for(lambda: sum(r.frame.camera_id == "cam0" for r in run.results) >= 12, timeout=20)
    cam0 = [r for r in run.results if r.frame.camera_id == "cam0"][2:]  # past the start
    queued = sorted(1000 * r.queued_s for r in cam0)
    gaps = sorted(1000 * np.diff([r.frame.capture_mono for r in cam0]))
    if max_queued_ms is not None:
        assert queued[int(0.9 * len(queued))] <= max_queued_ms, queued
    if max_gap_ms is not None:
        assert gaps[int(0.9 * len(gaps))] <= max_gap_ms, gaps
    if min_gap_ms is not None:
        assert median(gaps) >= min_gap_ms, gaps


def test_a_failing_batch_is_counted_and_the_batcher_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    detector = FakeDetector(0.002, 0.001, fail_on=[2])
    with caplog.at_level(logging.ERROR), Run(detector, cameras(50.0, 50.0)) as run:
        run.wait_for(lambda: run.batcher.stats().frames >= 20, timeout=20)
    stats = run.batcher.stats()
    assert stats.detector_errors == 1 and stats.frames_failed in (1, 2)
    assert stats.frames == len(run.results) and stats.batches == len(run.batches) == detector.calls - 1
    assert any("out of device memory" in (r.exc_text or "") for r in caplog.records)


def test_slo_out_of_reach_at_batch_one_is_reported(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING), Run(FakeDetector(0.12, 0.0), cameras(30.0), slo_ms=100.0) as run:
        run.wait_for(lambda: run.batcher.stats().frames >= 3, timeout=20)
    assert run.batcher.batch_size == 1
    assert any("missed at the smallest batch" in r.getMessage() for r in caplog.records)


def test_step_in_the_callers_thread_and_sources_added_and_removed() -> None:
    batcher = AdaptiveBatcher(FakeDetector(0.001, 0.0), policy=BatchPolicy(initial_batch=2))
    assert batcher.step(timeout=0.05) == []  # no camera: nothing, no hang
    a, b = cameras(40.0, 40.0)
    try:
        batcher.add_source(a)
        batcher.add_source(b)
        seen: set[str] = set()
        for _ in range(20):
            seen |= {r.frame.camera_id for r in batcher.step(timeout=1.0)}
        assert seen == {"cam0", "cam1"}
        assert batcher.remove_source("cam0") is a and batcher.remove_source("nope") is None
        time.sleep(0.05)
        later = [r.frame.camera_id for _ in range(10) for r in batcher.step(timeout=1.0)]
        assert later and set(later) == {"cam1"}
        stats = batcher.stats()
        assert stats.queue_depth in (0, 1) and stats.latency_samples == stats.frames
        assert set(stats.infer_ms_by_size) <= {1, 2}
    finally:
        a.close()
        b.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("capture:cam")]
