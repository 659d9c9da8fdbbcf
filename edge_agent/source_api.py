"""What every live frame source gives its consumer: the :class:`Source` interface and its data.

A :class:`Source` (a camera, a video file played live, a folder of images) captures on its own
clock and hands over the newest :class:`Frame`; its :class:`SourceState` and :class:`SourceStats`
say how it is doing; :class:`SourceError` is raised when one cannot be made. The consumers (the
agent, the batcher) depend on this interface only; the capture thread behind the live sources is
:mod:`edge_agent.capture`.

Import the public names from :mod:`edge_agent.sources`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from types import TracebackType
from typing import Any

import numpy as np

__all__ = ["Frame", "Source", "SourceError", "SourceState", "SourceStats"]


class SourceError(RuntimeError):
    """A source that cannot be opened or read; the message names it."""


@dataclass(frozen=True)
class Frame:
    index: int  # capture sequence number of its source, increasing; a gap is a frame never delivered
    pts: float  # seconds from the start of the stream
    image: np.ndarray  # BGR uint8, H x W x 3
    camera_id: str = ""
    capture_time: float = 0.0  # time.time() when the frame was captured, for records
    capture_mono: float = 0.0  # time.monotonic() when the frame was captured, for latency
    prepared: Any = None  # the detector's input made from ``image`` in the capture thread, if asked


class SourceState(StrEnum):
    STARTING = "starting"  # created or started, no frame yet
    RUNNING = "running"  # delivering frames
    RECONNECTING = "reconnecting"  # lost (open or read failed, or a live stream ended): waiting to retry
    ENDED = "ended"  # a finite source (file or folder without loop) delivered its last frame
    CLOSED = "closed"


@dataclass(frozen=True)
class SourceStats:
    camera_id: str
    state: SourceState
    captured: int  # frames read from the device
    delivered: int  # frames taken by the consumer
    dropped: int  # frames replaced in the slot before the consumer took them (newest frame wins)
    failures: int  # failed opens, failed reads and ended live streams
    reconnects: int  # recoveries: first frame after one or more failures
    consecutive_failures: int
    last_error: str | None


class Source(ABC):
    """A live camera: frames arrive on their own clock; :meth:`take` hands over the newest one."""

    camera_id: str
    describe: str  # what it reads, for logs (credentials redacted)

    @abstractmethod
    def start(self) -> None:
        """Start capturing in the background. Never raises for a camera that is offline."""

    @abstractmethod
    def take(self) -> Frame | None:
        """The newest frame not yet taken, or None; never blocks."""

    @abstractmethod
    def peek(self) -> Frame | None:
        """The frame :meth:`take` would return now, left in place."""

    @abstractmethod
    def wait(self, timeout: float | None = None) -> Frame | None:
        """Block until a frame is there (then take it), the source ended or closed, or ``timeout``."""

    @abstractmethod
    def add_listener(self, callback: Callable[[], None]) -> None:
        """``callback()`` runs in the capture thread after each new frame and each change of state."""

    @property
    @abstractmethod
    def state(self) -> SourceState: ...

    @abstractmethod
    def stats(self) -> SourceStats: ...

    @abstractmethod
    def close(self) -> None:
        """Stop the capture thread and release the device."""

    def __iter__(self) -> Iterator[Frame]:
        """Frames as they are taken, until the source ends or is closed (skipped frames are dropped)."""
        while True:
            frame = self.wait(0.5)
            if frame is not None:
                yield frame
            elif self.state in (SourceState.ENDED, SourceState.CLOSED):
                return

    def __enter__(self) -> Source:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
