"""Frame sources. Capture and decoding run in their own threads so a slow model never stalls them.

Two kinds, for two jobs:

- :class:`VideoFileSource`, for replay: every frame counts, so it blocks when its queue is
  full (no drops) and yields every frame in order.
- Live sources, for the running agent (:class:`Source`): :class:`FileStreamSource` (a video
  file played at its own frame rate, or as fast as it decodes), :class:`RtspSource`,
  :class:`UsbSource` (USB/V4L2) and :class:`ImageFolderSource`. Each keeps only the newest
  frame when the consumer falls behind and counts the frames it dropped; a camera that is lost
  is retried with capped exponential backoff and reported, never raised (see
  :mod:`edge_agent.capture`). :func:`open_source` builds one from a string.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import cv2
import numpy as np

from edge_agent.capture import Backoff, Capture, LiveSource
from edge_agent.source_api import Frame, Source, SourceError, SourceState, SourceStats

__all__ = [
    "IMAGE_SUFFIXES",
    "Backoff",
    "FileStreamSource",
    "Frame",
    "ImageFolderSource",
    "RtspSource",
    "Source",
    "SourceError",
    "SourceState",
    "SourceStats",
    "UsbSource",
    "VideoFileSource",
    "list_images",
    "open_source",
    "redact_url",
]

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})


def _probe_video(path: Path) -> tuple[cv2.VideoCapture, np.ndarray]:
    """Open ``path`` and decode its first frame (then rewind), or raise SourceError naming it."""
    if not path.is_file():
        raise SourceError(f"video {path} does not exist")
    cap = cv2.VideoCapture(str(path))
    ok, first = cap.read() if cap.isOpened() else (False, None)
    if not ok or first is None:
        cap.release()
        raise SourceError(f"video {path} cannot be decoded (corrupt, truncated or not a video)")
    cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
    return cap, first


_END = object()


class VideoFileSource:
    """Reads a recorded video as fast as the consumer takes frames, in a decoder thread."""

    def __init__(self, path: Path | str, prefetch: int = 8,
                 transform: Callable[[np.ndarray], Any] | None = None) -> None:
        self.path = Path(path)
        self.transform = transform  # run in the decoder thread (e.g. ``Detector.prepare``)
        cap, first = _probe_video(self.path)
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
                prepared = self.transform(image) if self.transform is not None else None
                self._queue.put(Frame(index, index / self.fps, image, self.path.stem, time.time(), time.monotonic(),
                                      prepared))
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


# ---- live sources ---------------------------------------------------------------------------


class FileStreamSource(LiveSource):
    """A video file as a camera: paced at its own frame rate (or ``fps``), or as fast as it decodes.

    The file must decode when the source is made (SourceError otherwise); if it goes away later,
    the source retries it like a lost camera. With ``loop`` it starts over at the end, pts and
    index running on; without, it ends (state ENDED).
    """

    def __init__(self, path: Path | str, camera_id: str | None = None, *, realtime: bool = True,
                 fps: float | None = None, loop: bool = False, backoff: Backoff | None = None) -> None:
        self.path = Path(path)
        cap, first = _probe_video(self.path)
        self.fps = float(fps or cap.get(cv2.CAP_PROP_FPS) or 30.0)  # the rate it plays at when realtime
        cap.release()
        self.width, self.height = first.shape[1], first.shape[0]
        super().__init__(camera_id or self.path.stem, lambda: cv2.VideoCapture(str(self.path)),
                         describe=f"video {self.path}", pace=(fps or "native") if realtime else None,
                         at_end="loop" if loop else "stop", media_pts=True, backoff=backoff)


def redact_url(url: str) -> str:
    """``url`` with its password replaced by ``***``, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


class RtspSource(LiveSource):
    """An RTSP camera through FFmpeg. A stream that ends or stalls past ``read_timeout`` is retried."""

    def __init__(self, url: str, camera_id: str | None = None, *, transport: str = "tcp",
                 open_timeout: float = 5.0, read_timeout: float = 5.0, backoff: Backoff | None = None) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("rtsp", "rtsps") or not parts.hostname:
            raise SourceError(f"{redact_url(url)} is not an rtsp:// URL")
        self.url = url
        params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, int(open_timeout * 1000),
                  cv2.CAP_PROP_READ_TIMEOUT_MSEC, int(read_timeout * 1000)]

        def open_capture() -> Capture:
            # FFmpeg reads its RTSP options from the environment, process-wide; an explicit setting wins.
            os.environ.setdefault("OPENCV_FFMPEG_CAPTURE_OPTIONS", f"rtsp_transport;{transport}")
            return cv2.VideoCapture(url, cv2.CAP_FFMPEG, params)

        default_id = (parts.hostname + parts.path).rstrip("/")
        super().__init__(camera_id or default_id, open_capture, describe=redact_url(url), backoff=backoff)


_DEV_VIDEO = re.compile(r"^/dev/video(\d+)$")


class UsbSource(LiveSource):
    """A USB/V4L2 camera by index (0) or device path (/dev/video0). Unplugged cameras are retried."""

    def __init__(self, device: int | str, camera_id: str | None = None, *, width: int | None = None,
                 height: int | None = None, fps: float | None = None, backoff: Backoff | None = None) -> None:
        if isinstance(device, str):
            m = _DEV_VIDEO.match(device)
            if m is None and not device.isdigit():
                raise SourceError(f"{device} is not a camera index or /dev/videoN")
            device = int(m.group(1) if m else device)
        self.device = device
        settings = [(cv2.CAP_PROP_FRAME_WIDTH, width), (cv2.CAP_PROP_FRAME_HEIGHT, height),
                    (cv2.CAP_PROP_FPS, fps), (cv2.CAP_PROP_BUFFERSIZE, 1)]

        def open_capture() -> Capture:
            cap = cv2.VideoCapture(device, cv2.CAP_V4L2 if os.name == "posix" else cv2.CAP_ANY)
            for prop, value in settings:
                if value:
                    cap.set(prop, float(value))
            return cap

        super().__init__(camera_id or f"usb{device}", open_capture, describe=f"/dev/video{device}",
                         backoff=backoff)


def _natural_key(path: Path) -> list[object]:
    return [int(tok) if tok.isdigit() else tok for tok in re.split(r"(\d+)", path.name.lower())]


def list_images(folder: Path) -> list[Path]:
    """The .jpg/.jpeg/.png files of ``folder`` in natural order (img2 before img10)."""
    return sorted((p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
                  key=_natural_key)


class _FolderCapture:
    """One pass over a folder's images as a capture; unreadable images are skipped, once logged."""

    def __init__(self, folder: Path, fps: float, warned: set[Path]) -> None:
        try:
            self._files = list_images(folder)
        except OSError:
            self._files = []
        self._fps = fps
        self._warned = warned
        self._i = 0

    def isOpened(self) -> bool:  # noqa: N802 - the Capture protocol
        return bool(self._files)

    def read(self) -> tuple[bool, np.ndarray | None]:
        while self._i < len(self._files):
            path = self._files[self._i]
            self._i += 1
            image = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if image is not None:
                return True, image
            if path not in self._warned:
                self._warned.add(path)
                log.warning("image %s cannot be read; skipped", path)
        return False, None

    def get(self, prop: int, /) -> float:
        return self._fps if prop == cv2.CAP_PROP_FPS else 0.0

    def release(self) -> None:
        self._files = []


class ImageFolderSource(LiveSource):
    """The images of a folder (.jpg/.jpeg/.png, natural order) as a camera at ``fps``.

    The folder is listed again at each pass, so images added meanwhile are picked up. It must
    hold an image when the source is made (SourceError otherwise); a folder that empties or goes
    away later is retried like a lost camera.
    """

    def __init__(self, folder: Path | str, camera_id: str | None = None, *, fps: float = 30.0,
                 realtime: bool = True, loop: bool = False, backoff: Backoff | None = None) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise SourceError(f"image folder {self.folder} does not exist")
        if not list_images(self.folder):
            raise SourceError(f"image folder {self.folder} holds no .jpg/.jpeg/.png image")
        warned: set[Path] = set()
        super().__init__(camera_id or self.folder.name, lambda: _FolderCapture(self.folder, fps, warned),
                         describe=f"image folder {self.folder}", pace=fps if realtime else None,
                         at_end="loop" if loop else "stop", media_pts=True, backoff=backoff)


def open_source(spec: str | int | Path, camera_id: str | None = None, *, loop: bool = False,
                realtime: bool = True, backoff: Backoff | None = None) -> Source:
    """A live source from a string: ``rtsp://...``, a camera index (``0``, ``usb:0``),
    ``/dev/videoN``, a folder of images, or a video file. Nothing is started."""
    text = str(spec)
    if text.startswith(("rtsp://", "rtsps://")):
        return RtspSource(text, camera_id, backoff=backoff)
    if isinstance(spec, int) or text.isdigit() or _DEV_VIDEO.match(text) or text.startswith("usb:"):
        return UsbSource(text.removeprefix("usb:"), camera_id, backoff=backoff)
    if "://" in text:
        raise SourceError(f"{redact_url(text)}: unsupported stream scheme (rtsp:// and rtsps:// are)")
    path = Path(text)
    if path.is_dir():
        return ImageFolderSource(path, camera_id, loop=loop, realtime=realtime, backoff=backoff)
    return FileStreamSource(path, camera_id, loop=loop, realtime=realtime, backoff=backoff)
