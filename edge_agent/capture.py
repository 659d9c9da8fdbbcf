"""The live-capture machinery behind :mod:`edge_agent.sources`: one thread per camera, newest frame wins.

A :class:`LiveSource` owns a capture thread that opens its device through an injected factory
(``cv2.VideoCapture`` for real cameras, anything with the same four methods in tests), reads
frames, optionally paces them, and puts each into a one-slot buffer. A consumer that falls
behind finds only the newest frame there; every frame it never saw is counted in ``dropped``.
A camera that cannot be opened, stops delivering, or (for network and USB cameras) ends is
retried with capped exponential backoff; the source reports it through :attr:`LiveSource.state`,
its counters and a WARNING log line, and never raises into the consumer.

Import the public names from :mod:`edge_agent.sources`; this module holds the machinery, and
:mod:`edge_agent.source_api` the interface it implements (:class:`~edge_agent.source_api.Source`,
:class:`~edge_agent.source_api.Frame`, its state, counters and error).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np

from edge_agent.source_api import Frame, Source, SourceError, SourceState, SourceStats

__all__ = [
    "Backoff",
    "Capture",
    "LiveSource",
    # re-exported from edge_agent.source_api, where they live now, for existing importers
    "Frame",
    "Source",
    "SourceError",
    "SourceState",
    "SourceStats",
]

log = logging.getLogger(__name__)


class Capture(Protocol):
    """What a live source needs from a device; ``cv2.VideoCapture`` has it."""

    def isOpened(self) -> bool: ...  # noqa: N802 - OpenCV's name

    def read(self) -> tuple[bool, Any]: ...

    def get(self, prop: int, /) -> float: ...

    def release(self) -> None: ...


@dataclass(frozen=True)
class Backoff:
    """Capped exponential backoff: retry ``n`` waits ``min(maximum, initial * factor**(n-1))``, +-jitter."""

    initial: float = 0.5
    maximum: float = 30.0
    factor: float = 2.0
    jitter: float = 0.1  # relative: 0.1 spreads each delay over +-10 %

    def __post_init__(self) -> None:
        if not (0 < self.initial <= self.maximum):
            raise ValueError(f"backoff needs 0 < initial <= maximum, got {self.initial}, {self.maximum}")
        if self.factor < 1 or not 0 <= self.jitter < 1:
            raise ValueError(f"backoff needs factor >= 1 and 0 <= jitter < 1, got {self.factor}, {self.jitter}")

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before retry number ``attempt`` (1 for the first retry)."""
        base = min(self.maximum, self.initial * self.factor ** min(max(attempt - 1, 0), 64))
        if self.jitter:
            base *= 1 + (rng or random).uniform(-self.jitter, self.jitter)
        return min(self.maximum, base)


AtEnd = Literal["reconnect", "loop", "stop"]


class LiveSource(Source):
    """A capture thread around ``open_capture()`` with a one-slot, newest-frame-wins buffer.

    Args:
        camera_id: name carried by every frame.
        open_capture: returns an opened (or failed: ``isOpened()`` False) capture; may raise.
        describe: what it reads, for logs and errors.
        pace: None reads as fast as the device delivers (cameras pace themselves); a number paces
            frames at that rate; ``"native"`` paces at the capture's own ``CAP_PROP_FPS``.
        at_end: when reads stop after at least one frame: ``"reconnect"`` (a live stream that
            ended is a lost camera), ``"loop"`` (reopen at once and go on), ``"stop"`` (ENDED).
        media_pts: pts from frame counts at the stream's rate (files, folders) rather than from
            the monotonic clock since :meth:`start` (live cameras).
        backoff: retry schedule of a lost camera.
    """

    def __init__(
        self,
        camera_id: str,
        open_capture: Callable[[], Capture],
        *,
        describe: str = "",
        pace: float | Literal["native"] | None = None,
        at_end: AtEnd = "reconnect",
        media_pts: bool = False,
        backoff: Backoff | None = None,
        fallback_fps: float = 30.0,
        seed: int | None = None,
    ) -> None:
        if isinstance(pace, (int, float)) and pace <= 0:
            raise ValueError(f"pace must be a positive frame rate, got {pace}")
        self.camera_id = camera_id
        self.describe = describe or camera_id
        self.backoff = backoff or Backoff()
        self._open_capture = open_capture
        self._pace = pace
        self._at_end = at_end
        self._media_pts = media_pts
        self._fallback_fps = fallback_fps
        self._rng = random.Random(seed)
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._listeners: list[Callable[[], None]] = []
        self._thread: threading.Thread | None = None
        self._frame: Frame | None = None
        self._state = SourceState.STARTING
        self._next_index = 0
        self._captured = self._delivered = self._dropped = 0
        self._failures = self._reconnects = self._consecutive = 0
        self._last_error: str | None = None
        self._lost_since = 0.0
        self._due: float | None = None  # when the next paced frame is due (monotonic)
        self._t0 = time.monotonic()
        #: Runs on every frame in the capture thread (e.g. ``Detector.prepare``: letterbox and
        #: layout), so that work is spread over the cameras' threads instead of the batcher's.
        self.transform: Callable[[np.ndarray], Any] | None = None
        self._transform_failed = False

    # ---- consumer side ----------------------------------------------------------------------
    def start(self) -> None:
        with self._cond:
            if self._thread is not None or self._state is SourceState.CLOSED:
                return
            self._t0 = time.monotonic()
            self._thread = threading.Thread(target=self._run, name=f"capture:{self.camera_id}", daemon=True)
        self._thread.start()

    def take(self) -> Frame | None:
        with self._cond:
            return self._take_locked()

    def peek(self) -> Frame | None:
        return self._frame

    def wait(self, timeout: float | None = None) -> Frame | None:
        with self._cond:
            self._cond.wait_for(
                lambda: self._frame is not None or self._state in (SourceState.ENDED, SourceState.CLOSED), timeout
            )
            return self._take_locked()

    def add_listener(self, callback: Callable[[], None]) -> None:
        self._listeners.append(callback)

    @property
    def state(self) -> SourceState:
        return self._state

    def stats(self) -> SourceStats:
        with self._cond:
            return SourceStats(
                camera_id=self.camera_id, state=self._state, captured=self._captured,
                delivered=self._delivered, dropped=self._dropped, failures=self._failures,
                reconnects=self._reconnects, consecutive_failures=self._consecutive,
                last_error=self._last_error,
            )

    def close(self, timeout: float = 2.0) -> None:
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():  # blocked in a device read; it exits when the read returns
                log.warning("camera %s (%s): capture thread still blocked after %.1f s", self.camera_id,
                            self.describe, timeout)
        self._set_state(SourceState.CLOSED)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.camera_id!r}, {self.describe!r}, state={self._state.value})"

    def _take_locked(self) -> Frame | None:
        frame, self._frame = self._frame, None
        if frame is not None:
            self._delivered += 1
        return frame

    # ---- capture thread ---------------------------------------------------------------------
    def _notify(self) -> None:
        for callback in list(self._listeners):
            try:
                callback()
            except Exception:  # a listener's bug must not kill the camera
                log.exception("camera %s: listener failed", self.camera_id)

    def _set_state(self, state: SourceState) -> None:
        with self._cond:
            if self._state is state or self._state is SourceState.CLOSED:
                return
            self._state = state
            self._cond.notify_all()
        self._notify()

    def _run(self) -> None:
        offset = 0.0  # media pts carried across loops
        while not self._stop.is_set():
            cap: Capture | None = None
            error: str | None
            try:
                cap = self._open_capture()
                error = None if cap.isOpened() else "cannot be opened"
            except Exception as exc:
                error = f"cannot be opened: {exc}"
            if error is None and cap is not None:
                n, fps, error = self._pump(cap, offset)
                offset += n / fps
            if cap is not None:
                try:
                    cap.release()
                except Exception:  # releasing a broken device must not stop the retries
                    log.debug("camera %s: release failed", self.camera_id, exc_info=True)
            if self._stop.is_set():
                break
            if error is None:  # a clean end after at least one frame
                if self._at_end == "stop":
                    self._set_state(SourceState.ENDED)
                    return
                if self._at_end == "loop":
                    continue
                error = "stream ended"
            self._lost(error)

    def _pump(self, cap: Capture, offset: float) -> tuple[int, float, str | None]:
        """Read until the stream ends, fails or the source closes: (frames, media fps, error or None)."""
        native = float(cap.get(5) or 0.0)  # cv2.CAP_PROP_FPS
        media_fps = native if 0 < native < 1000 else self._fallback_fps
        rate = media_fps if self._pace == "native" else self._pace
        period = 1.0 / rate if rate else 0.0
        n = 0
        while not self._stop.is_set():
            try:
                ok, image = cap.read()
            except Exception as exc:
                return n, media_fps, f"read failed: {exc}"
            if not ok or image is None:
                return n, media_fps, None if n else "no frame could be read"
            if period:  # the schedule runs on across a loop's reopen; a failure restarts it
                now = time.monotonic()
                self._due = now if self._due is None else self._due + period
                lag = self._due - now
                if lag > 0:
                    if self._stop.wait(lag):
                        break
                elif lag < -period:  # decoding fell behind: restart the schedule, do not burst
                    self._due = now
            mono, wall = time.monotonic(), time.time()
            pts = offset + n / media_fps if self._media_pts else mono - self._t0
            self._deliver(image, pts, wall, mono)
            n += 1
            if n == 1:
                self._connected()
        return n, media_fps, None

    def _deliver(self, image: np.ndarray, pts: float, wall: float, mono: float) -> None:
        prepared = None
        if self.transform is not None:
            try:
                prepared = self.transform(image)
            except Exception:  # the consumer falls back to the raw image; say so once
                if not self._transform_failed:
                    self._transform_failed = True
                    log.exception("camera %s: frame transform failed; passing raw frames", self.camera_id)
        with self._cond:
            if self._frame is not None:
                self._dropped += 1
            self._frame = Frame(self._next_index, pts, image, self.camera_id, wall, mono, prepared)
            self._next_index += 1
            self._captured += 1
            self._cond.notify_all()
        self._notify()

    def _connected(self) -> None:
        if self._consecutive:
            with self._cond:
                self._reconnects += 1
                failed, self._consecutive = self._consecutive, 0
            log.warning("camera %s (%s) is back after %d failed attempt(s), %.1f s without frames",
                        self.camera_id, self.describe, failed, time.monotonic() - self._lost_since)
        self._set_state(SourceState.RUNNING)

    def _lost(self, error: str) -> None:
        with self._cond:
            if not self._consecutive:
                self._lost_since = time.monotonic()
            self._failures += 1
            self._consecutive += 1
            self._last_error = error
            attempt = self._consecutive
        self._due = None
        delay = self.backoff.delay(attempt, self._rng)
        self._set_state(SourceState.RECONNECTING)
        log.warning("camera %s (%s) %s; retry %d in %.2f s", self.camera_id, self.describe, error, attempt, delay)
        self._stop.wait(delay)
