"""Replay a recorded video through a detector: results.jsonl, an annotated MP4, a report.

The results format is the project's interface for regression jobs (docs/formats.md):
one JSON object per frame, ``{"frame", "pts", "detections": [{"cls", "score", "box"}]}``,
boxes in the original frame's pixels. Outputs are written to temporary files and renamed
into place only when the replay finished, so a failed run never leaves half a file.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
from tqdm import tqdm

from edge_agent.annotate import draw_detections
from edge_agent.detector import Detector, Prepared, detect_pipelined
from edge_agent.sources import Frame, VideoFileSource
from models.detections import Detections

__all__ = ["ReplayReport", "replay"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReplayReport:
    video: str
    frames: int
    detections: int
    frames_with_detections: int
    seconds: float
    fps: float
    sessions: int  # model sessions run side by side
    model_version: str
    provider: str
    results: str
    annotated: str | None

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _batches(frames: Iterator[Frame], size: int) -> Iterator[list[Frame]]:
    batch: list[Frame] = []
    for frame in frames:
        batch.append(frame)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _detected(detector: Detector, batches: Iterator[list[Frame]]) -> Iterator[tuple[list[Frame], list[Detections]]]:
    """Each batch with its detections, in order, up to one batch per detector session in flight
    (ONNX Runtime on a CPU runs several sessions side by side)."""
    pairs: deque[list[Frame]] = deque()

    def items() -> Iterator[list[Prepared]]:
        for frames in batches:
            pairs.append(frames)
            yield [fr.prepared for fr in frames]

    for results in detect_pipelined(detector, items()):
        yield pairs.popleft(), results


def _tmp(path: Path) -> Path:
    # keep the real suffix last: OpenCV picks the container from it
    return path.with_name(f".{path.stem}.partial-{os.getpid()}{path.suffix}")


def replay(
    video: Path,
    detector: Detector,
    out: Path,
    annotated: Path | None = None,
    batch: int = 4,
    progress: bool = True,
) -> ReplayReport:
    """Run every frame of ``video`` through ``detector`` (loaded already)."""
    # letterbox in the decoder thread, beside the model rather than before it
    source = VideoFileSource(video, transform=detector.prepare)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = _tmp(out)
    writer = None
    tmp_video = None
    if annotated is not None:
        annotated = Path(annotated)
        annotated.parent.mkdir(parents=True, exist_ok=True)
        tmp_video = _tmp(annotated)
        # cv2.VideoWriter_fourcc exists at runtime but is missing from the cv2 stubs.
        writer = cv2.VideoWriter(str(tmp_video), cv2.VideoWriter_fourcc(*"mp4v"), source.fps,  # type: ignore[attr-defined]
                                 (source.width, source.height))
        if not writer.isOpened():
            raise RuntimeError(f"cannot open {annotated} for writing (mp4v codec unavailable?)")
    n_frames = n_dets = n_with = 0
    start = time.perf_counter()
    bar = tqdm(total=source.frame_count, unit="frame", desc=f"replay {Path(video).name}", disable=not progress)
    try:
        with tmp_out.open("w") as f:
            for frames, results in _detected(detector, _batches(iter(source), batch)):
                for fr, dets in zip(frames, results, strict=True):
                    record = {"frame": fr.index, "pts": round(fr.pts, 4),
                              "detections": dets.to_records(detector.classes)}
                    f.write(json.dumps(record) + "\n")
                    n_frames += 1
                    n_dets += len(dets)
                    n_with += bool(len(dets))
                    if writer is not None:
                        header = f"frame {fr.index}  model v{detector.version}  defects {len(dets)}"
                        writer.write(draw_detections(fr.image, dets, detector.classes, header))
                bar.update(len(frames))
        if writer is not None:
            writer.release()
            writer = None
            assert tmp_video is not None and annotated is not None
            os.replace(tmp_video, annotated)
        os.replace(tmp_out, out)
    finally:
        bar.close()
        source.close()
        if writer is not None:
            writer.release()
        for leftover in (tmp_out, tmp_video):
            if leftover is not None and leftover.exists():
                leftover.unlink()
    seconds = time.perf_counter() - start
    if n_frames == 0:
        raise RuntimeError(f"video {video} yielded no frames")
    return ReplayReport(
        video=str(video), frames=n_frames, detections=n_dets, frames_with_detections=n_with,
        seconds=round(seconds, 3), fps=round(n_frames / seconds, 2),
        sessions=int(getattr(detector, "workers", 1)), model_version=detector.version,
        provider=getattr(detector, "provider", ""), results=str(out),
        annotated=str(annotated) if annotated else None,
    )
