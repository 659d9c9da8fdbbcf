"""Detector plumbing that needs no model: pipelined detection keeps the input order."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Sequence

import numpy as np
import pytest

from edge_agent.detector import Detector, Prepared, detect_pipelined
from models.detections import Detections
from models.processing import LetterboxInfo


class SlowRandom(Detector):
    """Each call sleeps a random time; the single detection's score carries the frame's number."""

    classes = ["scratch"]
    input_size = (8, 8)
    version = "0.0.0"

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.rng = random.Random(0)
        self.lock = threading.Lock()
        self.active = self.peak = 0

    def load(self) -> None:
        pass

    def detect(self, frames: Sequence[np.ndarray]) -> list[Detections]:
        raise AssertionError("not used")

    def detect_prepared(self, items: Sequence[Prepared]) -> list[Detections]:
        with self.lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
            delay = self.rng.uniform(0.0, 0.01)
        time.sleep(delay)
        with self.lock:
            self.active -= 1
        return [Detections(np.zeros((1, 4), np.float32), np.array([p.data[0, 0] / 1000], np.float32),
                           np.zeros(1, np.int32)) for p in items]


@pytest.mark.parametrize(("workers", "depth", "peak"), [(1, None, 1), (3, None, 3), (3, 2, 2), (4, 1, 1)])
def test_pipelined_results_come_back_in_input_order(workers: int, depth: int | None, peak: int) -> None:
    det = SlowRandom(workers)
    info = LetterboxInfo(scale=1.0, pad_x=0.0, pad_y=0.0, orig_w=8, orig_h=8)
    batches = [[Prepared(np.full((1, 1), i, np.float32), info)] for i in range(60)]
    scores = [float(r[0].scores[0]) for r in detect_pipelined(det, batches, depth=depth)]
    assert scores == pytest.approx([i / 1000 for i in range(60)])
    assert det.peak == peak  # how many batches were in flight at once


class RawOnly(Detector):
    """A backend that implements only ``detect``: the base class's prepare/detect_prepared carry it."""

    classes = ["scratch"]
    input_size = (8, 8)
    version = "0.0.0"

    def load(self) -> None:
        pass

    def detect(self, frames: Sequence[np.ndarray]) -> list[Detections]:
        return [Detections(np.array([[0, 0, f.shape[1], f.shape[0]]], np.float32), np.array([0.5], np.float32),
                           np.zeros(1, np.int32)) for f in frames]


def test_a_raw_only_backend_works_through_the_prepared_path() -> None:
    det = RawOnly()
    frames = [np.zeros((10, 20, 3), np.uint8), np.zeros((30, 40, 3), np.uint8)]
    prepared = [det.prepare(f) for f in frames]
    assert all(p.info is None and p.data is f for p, f in zip(prepared, frames, strict=True))
    got = [d.boxes.tolist() for d in det.detect_prepared(prepared)]
    assert got == [[[0.0, 0.0, 20.0, 10.0]], [[0.0, 0.0, 40.0, 30.0]]]
