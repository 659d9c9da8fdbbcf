"""hub/heads.py: a head warms every batch size its runner keeps kernels for, up to the service's
``max_batch``, then times one frame (the service's batch sizing starts from that)."""

from __future__ import annotations

import weakref
from typing import Any

import numpy as np
import pytest

from hub.heads import Head
from models.detections import Detections
from models.feature_codec import FeatureSpec

SPEC = FeatureSpec(cut=4, channels=4, height=8, width=12, bits=4, codec="zlib")


class RecordingRunner:
    provider = "recording"

    def __init__(self, buckets: tuple[int, ...] | None) -> None:
        if buckets is not None:
            self.batch_buckets = buckets
        self.sizes: list[int] = []

    def detect(self, codes: np.ndarray, **kw: Any) -> list[Detections]:
        assert codes.shape[1:] == SPEC.shape and codes.dtype == np.uint8
        self.sizes.append(len(codes))
        return [Detections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int32))
                for _ in codes]


@pytest.mark.parametrize(("buckets", "max_batch", "runs"), [
    (None, 32, [1, 1]),  # ONNX Runtime: any size as it is, one warm-up frame
    ((), 32, [1, 1]),  # torch on a CPU: no buckets
    ((1, 2, 4, 8, 16, 32, 64), 32, [1, 2, 4, 8, 16, 32, 1]),  # torch on a GPU: every bucket up to max_batch
    ((1, 2, 4, 8), 5, [1, 2, 4, 1]),
])
def test_warm_runs_each_bucket_up_to_max_batch_then_times_one_frame(buckets: tuple[int, ...] | None,
                                                                    max_batch: int, runs: list[int]) -> None:
    runner = RecordingRunner(buckets)
    head = Head("1.0.0", SPEC, runner, 0.25, 0.45, 300, (64, 96))
    assert head.frame_ms == 0.0
    warm_ms = head.warm(max_batch)
    assert runner.sizes == runs
    assert warm_ms >= 0 and head.frame_ms > 0


class Cycle:
    def __init__(self) -> None:
        self.me = self


def test_loads_hold_off_the_collector_and_freeze_what_they_made() -> None:
    """Two loads that overlap (two threads): no automatic collection until the last one ends,
    then what they made is frozen; the collector is on again. release_unloaded gives frozen
    cycles back to it."""
    import gc
    import threading

    from hub.heads import quiet_collector, release_unloaded

    assert gc.isenabled()
    inside, second_in, first_out = [], threading.Event(), threading.Event()

    def second() -> None:
        with quiet_collector():
            second_in.set()
            first_out.wait(5)
            inside.append(gc.isenabled())  # still off: the other load has left, this one has not

    gc.unfreeze()
    try:
        t = threading.Thread(target=second)
        with quiet_collector():
            made: list[list[int]] = [[] for _ in range(1000)]  # objects a load makes
            t.start()
            assert second_in.wait(5)
            inside.append(gc.isenabled())
        first_out.set()
        t.join(5)
        assert inside == [False, False] and gc.isenabled()
        assert gc.get_freeze_count() >= len(made)
        node = Cycle()
        gone = weakref.ref(node)
        gc.freeze()  # an unloaded head's objects: frozen, in a cycle, no longer referenced
        del node
        gc.collect()
        assert gone() is not None  # frozen: the collector does not see it
        assert release_unloaded() >= 0 and gc.isenabled()
        assert gone() is None
    finally:
        gc.unfreeze()
