"""Frame sources: replay's lossless reader, live sources (pacing, newest frame wins, loss and recovery)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_agent.capture import Capture, LiveSource
from edge_agent.sources import (
    Backoff,
    FileStreamSource,
    Frame,
    ImageFolderSource,
    RtspSource,
    Source,
    SourceError,
    SourceState,
    UsbSource,
    VideoFileSource,
    open_source,
)

FAST = Backoff(initial=0.02, maximum=0.04, factor=2.0, jitter=0.0)


def shade(i: int) -> int:
    """The grey level of frame ``i`` of the test videos (up to 23): frames are told apart by brightness."""
    assert 0 <= i < 24
    return 20 + 10 * i


def write_video(path: Path, n: int, fps: float = 30.0) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"mp4v"), fps, (160, 120))
    assert writer.isOpened()
    for i in range(n):
        writer.write(np.full((120, 160, 3), shade(i), np.uint8))
    writer.release()
    return path


def frame_number(frame: Frame) -> int:
    return round((float(frame.image.mean()) - 20) / 10)


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "condition not met in time"
        time.sleep(0.005)


def drain(source: Source, n: int, timeout: float = 5.0) -> list[Frame]:
    frames: list[Frame] = []
    end = time.monotonic() + timeout
    while len(frames) < n and time.monotonic() < end:
        frame = source.wait(0.1)
        if frame is not None:
            frames.append(frame)
    return frames


# ---- replay's VideoFileSource -------------------------------------------------------------


@pytest.mark.parametrize(("n", "fps"), [(12, 30.0), (5, 10.0)])
def test_video_file_source_yields_every_frame_in_order(tmp_path: Path, n: int, fps: float) -> None:
    video = write_video(tmp_path / "cam.mp4", n, fps)
    frames = list(VideoFileSource(video, prefetch=2))  # a queue smaller than the video: blocks, never drops
    assert [f.index for f in frames] == list(range(n))
    assert [frame_number(f) for f in frames] == list(range(n))
    assert [f.pts for f in frames] == pytest.approx([i / fps for i in range(n)])
    assert {f.camera_id for f in frames} == {"cam"}


BROKEN = {
    "garbage": lambda p: p.write_bytes(b"this is not a video" * 100),
    "truncated": lambda p: p.write_bytes(write_video(p.with_name("ok.mp4"), 20).read_bytes()[:2000]),
    "empty": lambda p: p.write_bytes(b""),
    "missing": lambda p: None,
}


@pytest.mark.parametrize("kind", [VideoFileSource, FileStreamSource])
@pytest.mark.parametrize(("broken", "message"), [("garbage", "cannot be decoded"), ("truncated", "cannot be decoded"),
                                                 ("empty", "cannot be decoded"), ("missing", "does not exist")])
def test_unreadable_video_raises_naming_the_file(tmp_path: Path, kind: type, broken: str, message: str) -> None:
    video = tmp_path / "broken.mp4"
    BROKEN[broken](video)
    with pytest.raises(SourceError, match=message) as err:
        kind(video)
    assert str(video) in str(err.value)


# ---- live file and folder sources -----------------------------------------------------------


@pytest.mark.parametrize(("fps", "rate"), [(None, 50.0), (100.0, 100.0)], ids=["native", "override"])
def test_file_stream_is_paced_at_its_frame_rate(tmp_path: Path, fps: float | None, rate: float) -> None:
    video = write_video(tmp_path / "line.mp4", 15, fps=50.0)
    with FileStreamSource(video, "cam-a", fps=fps) as source:
        start = time.time()
        frames = list(source)
        assert source.state is SourceState.ENDED
        stats = source.stats()
    # A consumer that keeps up loses nothing (on a loaded machine, a late wake-up may lose a frame).
    assert (stats.captured, stats.delivered + stats.dropped, stats.failures) == (15, 15, 0)
    assert stats.dropped <= 2 and frames[0].index == 0 and frames[-1].index == 14
    assert [frame_number(f) for f in frames] == [f.index for f in frames]
    assert [f.pts for f in frames] == pytest.approx([f.index / 50.0 for f in frames])  # media time, whatever the pace
    assert {f.camera_id for f in frames} == {"cam-a"}
    spacing = (frames[-1].capture_mono - frames[0].capture_mono) / 14
    assert 0.8 / rate <= spacing <= 2.5 / rate
    assert start - 0.1 <= frames[0].capture_time <= frames[-1].capture_time <= time.time()


def test_newest_frame_wins_and_drops_are_counted(tmp_path: Path) -> None:
    video = write_video(tmp_path / "line.mp4", 24)
    with FileStreamSource(video, realtime=False) as source:  # decodes flat out; the consumer dawdles
        first = source.wait(5.0)
        wait_until(lambda: source.state is SourceState.ENDED)
        last = source.take()
        assert source.take() is None
        stats = source.stats()
    assert first is not None and last is not None
    assert last.index == 23 and frame_number(last) == 23  # the newest frame, not the oldest waiting
    assert first.index < last.index
    assert (stats.captured, stats.delivered, stats.dropped) == (24, 2, 22)  # every frame not handed over


def test_fast_producer_slow_consumer_gaps_equal_drops() -> None:
    source = LiveSource("synthetic", lambda: _Conn(Session(10_000, period=0.002)))
    got: list[Frame] = []
    with source:
        for _ in range(8):
            time.sleep(0.03)
            frame = source.wait(1.0)
            assert frame is not None
            got.append(frame)
        source.close()  # stop capturing before counting
        stats = source.stats()
    indices = [f.index for f in got]
    assert indices == sorted(set(indices))
    # Dropped: every index the consumer skipped, plus the frames captured after its last take but
    # one, which still waits in the slot.
    tail = stats.captured - indices[-1] - 1
    assert stats.dropped == (indices[-1] + 1 - len(got)) + max(tail - 1, 0)
    assert stats.delivered == len(got) and stats.dropped > 4 * stats.delivered


def test_file_stream_loops_with_index_and_pts_running_on(tmp_path: Path) -> None:
    video = write_video(tmp_path / "line.mp4", 5, fps=200.0)
    with FileStreamSource(video, loop=True) as source:
        frames = drain(source, 12)
        assert source.state is SourceState.RUNNING
    assert len(frames) == 12
    indices = [f.index for f in frames]
    assert indices == sorted(set(indices)) and indices[-1] >= 5
    for f in frames:
        assert frame_number(f) == f.index % 5
        assert f.pts == pytest.approx(f.index / 200.0)


def write_images(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        cv2.imwrite(str(folder / name), np.full((24, 32, 3), shade(i), np.uint8))


def test_folder_source_plays_images_in_natural_order_and_skips_the_rest(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "station"
    write_images(folder, ["img1.png", "img2.jpg", "IMG3.PNG", "img10.jpeg"])  # shades 0..3 in natural order
    (folder / "notes.txt").write_text("not an image")
    (folder / "img5.png").write_bytes(b"corrupt")
    with caplog.at_level(logging.WARNING), ImageFolderSource(folder, fps=200.0) as source:
        frames = list(source)
        assert source.state is SourceState.ENDED
        stats = source.stats()
    # Frame i of the pass is the i-th image in natural order (drops, if any, leave gaps in both).
    assert [frame_number(f) for f in frames] == [f.index for f in frames]
    assert frames[-1].index == 3 and stats.captured == 4 and stats.dropped == 4 - len(frames)
    assert {f.camera_id for f in frames} == {"station"}
    assert any("img5.png" in r.getMessage() and "skipped" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(("setup", "message"), [(lambda p: None, "does not exist"),
                                                (lambda p: p.mkdir(), "holds no"),
                                                (lambda p: write_images(p, ["a.bmp"]), "holds no")])
def test_folder_source_refuses_a_folder_without_images(tmp_path: Path, setup: Callable, message: str) -> None:
    folder = tmp_path / "images"
    setup(folder)
    with pytest.raises(SourceError, match=message) as err:
        ImageFolderSource(folder)
    assert str(folder) in str(err.value)


def test_folder_that_disappears_and_returns_is_retried_and_resumes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder, away = tmp_path / "cam", tmp_path / "cam.away"
    write_images(folder, ["0.png", "1.png", "2.png"])
    with caplog.at_level(logging.WARNING), ImageFolderSource(folder, "cam-7", fps=100.0, loop=True,
                                                             backoff=FAST) as source:
        before = drain(source, 2)
        folder.rename(away)
        wait_until(lambda: source.state is SourceState.RECONNECTING and source.stats().failures >= 2)
        lost = source.stats()
        away.rename(folder)
        wait_until(lambda: source.state is SourceState.RUNNING)
        after = drain(source, 2)
        stats = source.stats()
    assert lost.consecutive_failures >= 2 and lost.last_error == "cannot be opened"
    assert stats.reconnects == 1 and stats.consecutive_failures == 0
    assert len(before) == len(after) == 2 and after[0].index > before[-1].index
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("cam-7" in m and "retry 2 in 0.04 s" in m for m in messages)
    assert any("cam-7" in m and "is back after" in m for m in messages)


# ---- a lost camera, through an injected capture -------------------------------------------


class Session:
    """One scripted connection: ``opens`` False fails the open; ``frames`` reads, then ``then``."""

    def __init__(self, frames: int = 0, *, opens: bool = True, raises: bool = False, then: str = "end",
                 period: float = 0.0) -> None:
        self.frames, self.opens, self.raises, self.then, self.period = frames, opens, raises, then, period


class ScriptedCapture:
    def __init__(self, script: list[Session], attempts: list[float] | None = None) -> None:
        self._sessions: Iterator[Session] = iter(script)
        self.attempts = attempts

    def __call__(self) -> Capture:  # the factory: each call is one open attempt
        if self.attempts is not None:
            self.attempts.append(time.monotonic())
        session = next(self._sessions, Session(opens=False))
        if session.raises:
            raise OSError("device busy")
        return _Conn(session)


class _Conn:
    def __init__(self, session: Session) -> None:
        self.session, self.n = session, 0

    def isOpened(self) -> bool:  # noqa: N802
        return self.session.opens

    def read(self) -> tuple[bool, np.ndarray | None]:
        if self.n >= self.session.frames:
            if self.session.then == "raise":
                raise RuntimeError("usb unplugged")
            return False, None
        time.sleep(self.session.period)
        self.n += 1
        return True, np.full((4, 4, 3), self.n % 256, np.uint8)

    def get(self, prop: int, /) -> float:
        return 0.0

    def release(self) -> None:
        pass


def test_lost_camera_is_retried_with_capped_backoff_and_recovers(caplog: pytest.LogCaptureFixture) -> None:
    attempts: list[float] = []
    script = [
        Session(raises=True),  # 1: open raises              -> retry 1 after 0.02 s
        Session(opens=False),  # 2: open fails               -> retry 2 after 0.04 s
        Session(raises=True),  # 3: open raises              -> retry 3 after min(0.08, cap 0.04) s
        Session(3),  # 4: back; 3 frames, then the stream ends -> retry 1 after 0.02 s (backoff restarts)
        Session(0, then="raise"),  # 5: opens, first read raises  -> retry 2 after 0.04 s
        Session(10_000, period=0.005),  # 6: back for good
    ]
    source = LiveSource("line-3", ScriptedCapture(script, attempts), describe="rtsp://line-3", backoff=FAST)
    with caplog.at_level(logging.WARNING), source:
        wait_until(lambda: source.stats().reconnects == 2)
        frames = drain(source, 3)
        stats = source.stats()
    assert len(attempts) == 6
    gaps = np.diff(attempts)
    expected = [0.02, 0.04, 0.04, 0.02, 0.04]
    assert all(g >= e * 0.95 for g, e in zip(gaps, expected, strict=True)), gaps
    assert stats.state is SourceState.RUNNING
    assert (stats.failures, stats.reconnects, stats.consecutive_failures) == (5, 2, 0)
    assert stats.last_error == "read failed: usb unplugged"
    assert stats.captured >= 3 + 3 and min(f.index for f in frames) >= 3  # numbering runs on across connections
    messages = [r.getMessage() for r in caplog.records]
    for text in ("cannot be opened: device busy; retry 1 in 0.02 s", "cannot be opened; retry 2 in 0.04 s",
                 "retry 3 in 0.04 s", "stream ended; retry 1 in 0.02 s", "is back after 3 failed attempt(s)",
                 "read failed: usb unplugged; retry 2 in 0.04 s", "is back after 2 failed attempt(s)"):
        assert any(text in m for m in messages), text


@pytest.mark.parametrize(
    ("backoff", "delays"),
    [
        (Backoff(initial=0.5, maximum=30.0, factor=2.0, jitter=0.0), [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]),
        (Backoff(initial=1.0, maximum=5.0, factor=3.0, jitter=0.0), [1.0, 3.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0]),
        (Backoff(initial=2.0, maximum=2.0, factor=1.0, jitter=0.0), [2.0] * 8),
    ],
)
def test_backoff_schedule_is_exponential_and_capped(backoff: Backoff, delays: list[float]) -> None:
    assert [backoff.delay(n) for n in range(1, 9)] == pytest.approx(delays)
    assert backoff.delay(10_000) == backoff.maximum  # no overflow, however long the camera stays away


def test_backoff_jitter_stays_within_its_band() -> None:
    import random

    b = Backoff(initial=1.0, maximum=10.0, jitter=0.2)
    rng = random.Random(1)
    draws = [b.delay(2, rng) for _ in range(500)]
    assert 1.6 <= min(draws) < 1.7 and 2.3 < max(draws) <= 2.4
    assert all(b.delay(9, rng) <= 10.0 for _ in range(100))


@pytest.mark.parametrize("kwargs", [{"initial": 0}, {"initial": 5, "maximum": 1}, {"factor": 0.5}, {"jitter": 1.0}])
def test_backoff_rejects_nonsense(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        Backoff(**kwargs)


def test_absent_usb_camera_is_retried_not_raised() -> None:
    source = UsbSource("/dev/video63", backoff=FAST)
    with source:
        wait_until(lambda: source.stats().failures >= 2)
        assert source.state is SourceState.RECONNECTING
        assert source.wait(0.01) is None
    assert source.state is SourceState.CLOSED


# ---- open_source ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "kind", "camera_id", "describe"),
    [
        ("rtsp://admin:s3cret@cam.local:554/live/main", RtspSource, "cam.local/live/main",
         "rtsp://admin:***@cam.local:554/live/main"),
        ("rtsp://10.0.0.7/stream", RtspSource, "10.0.0.7/stream", "rtsp://10.0.0.7/stream"),
        ("0", UsbSource, "usb0", "/dev/video0"),
        ("usb:2", UsbSource, "usb2", "/dev/video2"),
        ("/dev/video3", UsbSource, "usb3", "/dev/video3"),
        ("{tmp}/station", ImageFolderSource, "station", "image folder {tmp}/station"),
        ("{tmp}/line.mp4", FileStreamSource, "line", "video {tmp}/line.mp4"),
    ],
)
def test_open_source_picks_the_source_from_the_spec(tmp_path: Path, spec: str, kind: type, camera_id: str,
                                                    describe: str) -> None:
    write_images(tmp_path / "station", ["a.png"])
    write_video(tmp_path / "line.mp4", 3)
    source = open_source(spec.format(tmp=tmp_path))
    assert type(source) is kind
    assert (source.camera_id, source.describe) == (camera_id, describe.format(tmp=tmp_path))
    assert source.state is SourceState.STARTING  # nothing opened or started yet
    assert "s3cret" not in repr(source)
    assert open_source(spec.format(tmp=tmp_path), "named").camera_id == "named"


@pytest.mark.parametrize(("spec", "message"), [("http://cam.local/mjpeg", "unsupported stream scheme"),
                                               ("/dev/videoX", "does not exist"),
                                               ("rtsp://", "is not an rtsp:// URL")])
def test_open_source_refuses_what_it_cannot_read(spec: str, message: str) -> None:
    with pytest.raises(SourceError, match=message):
        open_source(spec)


def test_close_stops_a_capture_blocked_between_frames() -> None:
    gate = threading.Event()

    class Slow(_Conn):
        def read(self) -> tuple[bool, np.ndarray | None]:
            gate.wait(0.2)
            return super().read()

    source = LiveSource("slow", lambda: Slow(Session(10_000)), pace=1.0)  # one frame a second
    source.start()
    assert source.wait(2.0) is not None
    t0 = time.monotonic()
    source.close()
    assert time.monotonic() - t0 < 0.5 and source.state is SourceState.CLOSED
    assert not any(t.name == "capture:slow" for t in threading.enumerate())
