"""Sampling policy: reasons, priorities, the random negative share and the per-camera rate limit."""

from __future__ import annotations

import numpy as np
import pytest

from edge_agent.sampler import SamplePolicy
from models.detections import Detections


def dets(*scores: float) -> Detections:
    n = len(scores)
    boxes = np.tile(np.array([[0, 0, 10, 10]], np.float32), (n, 1)) if n else np.zeros((0, 4), np.float32)
    return Detections(boxes=boxes, scores=np.array(scores, np.float32), class_ids=np.zeros(n, np.int32))


@pytest.mark.parametrize(
    ("scores", "expected"),
    [((0.9,), "defect"), ((0.3,), "defect"), ((0.29, 0.1), "uncertain"), ((0.1,), "uncertain"),
     ((0.04,), None), ((), None), ((0.31, 0.1), "defect"), ((0.25,), None)],
)
def test_reason(scores: tuple[float, ...], expected: str | None) -> None:
    policy = SamplePolicy(defect_conf=0.3, uncertain_band=(0.05, 0.25), negative_rate=0.0)
    assert policy.classify(dets(*scores)) == expected


def test_random_negatives_take_about_their_share() -> None:
    policy = SamplePolicy(defect_conf=0.3, negative_rate=0.05, max_per_minute=1e9, seed=1)
    picked = sum(policy.decide("cam", dets()).reason == "random_negative" for _ in range(20000))
    assert 800 < picked < 1200  # 5% of 20,000 = 1,000; binomial sd ~31


def test_rate_limit_per_camera_refills_over_time() -> None:
    now = [0.0]
    policy = SamplePolicy(defect_conf=0.3, max_per_minute=6, clock=lambda: now[0])
    got = [policy.decide("a", dets(0.9)).reason for _ in range(10)]
    assert got.count("defect") == 6 and policy.counts["rate_limited"] == 4
    assert policy.decide("b", dets(0.9)).reason == "defect"  # another camera has its own bucket
    now[0] += 10.0  # 6 per minute -> one token per 10 s
    assert policy.decide("a", dets(0.9)).reason == "defect"
    assert policy.decide("a", dets(0.9)).rate_limited


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [({"uncertain_band": (0.3, 0.1)}, "uncertain_band"), ({"defect_conf": 1.5}, "defect_conf"),
     ({"max_per_minute": 0}, "max_per_minute")],
)
def test_bad_policy(kwargs: dict, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        SamplePolicy(**{"defect_conf": 0.3, **kwargs})
