"""Frame sources. Decoding runs in its own thread so a slow model never stalls it.

For replay every frame counts, so :class:`VideoFileSource` blocks when its queue is full
(no drops); live sources (RTSP, USB) will keep only the newest frame instead.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

__all__ = ["Frame", "SourceError", "VideoFileSource"]


class SourceError(RuntimeError):
    """A source that cannot be opened or read; the message names it."""


@dataclass(frozen=True)
class Frame:
    index: int
    pts: float  # seconds from the start of the stream
    image: np.ndarray  # BGR uint8, H x W x 3


_END = object()


class VideoFileSource:
    """Reads a recorded video as fast as the consumer takes frames, in a decoder thread."""

    def __init__(self, path: Path | str, prefetch: int = 8) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise SourceError(f"video {self.path} does not exist")
        cap = cv2.VideoCapture(str(self.path))
        ok, first = cap.read() if cap.isOpened() else (False, None)
        if not ok or first is None:
            cap.release()
            raise SourceError(f"video {self.path} cannot be decoded (corrupt, truncated or not a video)")
        cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
        self.fps = float(cap.get(cv2.CAP_PROP_FPS)) or 30.0
        self.frame_count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) or None
        self.width, self.height = first.shape[1], first.shape[0]
        self._cap = cap
        self._queue: queue.Queue[object] = queue.Queue(maxsize=prefetch)
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"decode:{self.path.name}", daemon=True)
        self.decode_errors = 0

    def _run(self) -> None:
        index = 0
        try:
            while not self._stop.is_set():
                ok, image = self._cap.read()
                if not ok:
                    break
                self._queue.put(Frame(index, index / self.fps, image))
                index += 1
        except BaseException as exc:  # surfaced to the consumer, never swallowed
            self._error = exc
        finally:
            self._cap.release()
            self._queue.put(_END)

    def __iter__(self) -> Iterator[Frame]:
        self._thread.start()
        while True:
            item = self._queue.get()
            if item is _END:
                break
            assert isinstance(item, Frame)
            yield item
        self._thread.join()
        if self._error is not None:
            raise SourceError(f"decoding {self.path} failed: {self._error}") from self._error

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get_nowait()
            except queue.Empty:
                self._thread.join(timeout=0.05)
