"""Swap the running model between frames, without dropping any (issue 6).

:class:`SwappableDetector` wraps the detector the agent runs. :meth:`~SwappableDetector.swap`
loads and warms the new detector first, beside the old one (the old keeps serving meanwhile), then
switches in one assignment under a lock. A frame letterboxed by the old detector in a capture
thread just before the switch still runs on the old one (each prepared frame remembers who made
it), so no frame is dropped or run with the wrong input size; the old detector is kept until the
next swap.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge_agent.detector import Detector, Prepared
from models.detections import Detections

__all__ = ["SwappableDetector"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Owned(Prepared):
    owner: Any = None


class SwappableDetector(Detector):
    def __init__(self, detector: Detector) -> None:
        self._active = detector
        self._old: Detector | None = None
        self._lock = threading.Lock()
        self.swaps = 0

    # what the rest of the agent reads: always the active detector's
    @property
    def active(self) -> Detector:
        return self._active

    @property
    def classes(self) -> list[str]:  # type: ignore[override]
        return self._active.classes

    @property
    def input_size(self) -> tuple[int, int]:  # type: ignore[override]
        return self._active.input_size

    @property
    def version(self) -> str:  # type: ignore[override]
        return self._active.version

    def __getattr__(self, name: str) -> Any:  # conf, provider, workers, stats ... of the active detector
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._active, name)

    def load(self) -> None:
        self._active.load()

    def swap(self, new: Detector) -> str:
        """Load and warm ``new`` (raises, leaving the old one running, if it cannot), then switch.
        Returns the version replaced."""
        new.load()
        with self._lock:
            self._old, self._active = self._active, new
            self.swaps += 1
        log.warning("model swapped: %s -> %s", self._old.version, new.version)
        return self._old.version

    def prepare(self, image: np.ndarray) -> Prepared:
        d = self._active
        p = d.prepare(image)
        return _Owned(p.data, p.info, d)

    def detect(self, frames: Sequence[np.ndarray]) -> list[Detections]:
        return self._active.detect(frames)

    def detect_prepared(self, items: Sequence[Prepared]) -> list[Detections]:
        with self._lock:
            active: Detector = self._active
            old: Detector | None = self._old
        groups: dict[int, tuple[Detector, list[int]]] = {}
        for k, p in enumerate(items):
            owner = getattr(p, "owner", None)
            d: Detector = active
            if owner is old and old is not None:
                d = old
            if owner is not None and owner is not d:  # made by a detector two swaps ago
                raise ValueError("a frame prepared by a detector that is no longer loaded")
            groups.setdefault(id(d), (d, []))[1].append(k)
        out: list[Detections | None] = [None] * len(items)
        for runner, idx in groups.values():
            for k, det in zip(idx, runner.detect_prepared([Prepared(items[k].data, items[k].info) for k in idx]),
                              strict=True):
                out[k] = det
        return [d for d in out if d is not None]
