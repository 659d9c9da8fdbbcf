"""Detector backends behind one small interface: ``load()`` then ``detect(frames)``.

:class:`OnnxDetector` runs a bundle's ONNX model with ONNX Runtime. It picks the best
execution provider the installed onnxruntime offers (TensorRT, CUDA, then CPU) unless told
otherwise, logs which one runs, and checks the ONNX metadata against the bundle manifest
before the first frame.
"""

from __future__ import annotations

import logging
import os
import queue
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.bundle import Bundle, Postprocessing
from models.detections import Detections
from models.processing import LetterboxInfo, postprocess, preprocess_batch

__all__ = ["Detector", "DetectorError", "OnnxDetector", "Prepared", "detect_pipelined"]

log = logging.getLogger(__name__)

PROVIDER_PREFERENCE = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


@dataclass(frozen=True)
class Prepared:
    """A frame already made into one detector's input, and how to map boxes back to the frame."""

    data: np.ndarray
    info: LetterboxInfo | None  # None: ``data`` is the frame itself (no letterbox yet)


class DetectorError(RuntimeError):
    """A model that cannot be loaded or run; the message names the file."""


class Detector(ABC):
    """Runs a detection model on batches of BGR frames."""

    classes: list[str]
    input_size: tuple[int, int]
    version: str

    def _configure(self, bundle: Bundle, conf: float | None, iou: float | None) -> None:
        """What every backend takes from the manifest: classes, input size, version, thresholds."""
        self.bundle = bundle
        manifest = bundle.manifest
        self.classes = list(manifest.classes)
        self.input_size = (int(manifest.input_size[0]), int(manifest.input_size[1]))
        self.version = manifest.version
        post: Postprocessing | dict[str, Any] = manifest.postprocessing or {}
        operating = post.get("operating_conf")
        default_conf = operating if operating is not None else post.get("conf", 0.25)
        self.conf = float(conf if conf is not None else default_conf)
        self.iou = float(iou if iou is not None else post.get("iou", 0.7))
        self.max_det = int(post.get("max_det", 300))

    @abstractmethod
    def load(self) -> None:
        """Load and warm the model. Raises DetectorError with the file's name on failure."""

    @abstractmethod
    def detect(self, frames: Sequence[np.ndarray]) -> list[Detections]:
        """One :class:`Detections` per frame, boxes in that frame's pixel coordinates."""

    def prepare(self, image: np.ndarray) -> Prepared:
        """Turn ``image`` into this model's input, where there are cores to spare (a capture
        thread). Default: the frame itself; backends override it with their letterbox."""
        return Prepared(image, None)

    def detect_prepared(self, items: Sequence[Prepared]) -> list[Detections]:
        """:meth:`detect` on frames already :meth:`prepare`-d; same results. Default: the
        frames kept by the default :meth:`prepare` go through :meth:`detect`."""
        return self.detect([p.data for p in items])


class OnnxDetector(Detector):
    """A bundle's ONNX model (INT8 by default) on ONNX Runtime."""

    def __init__(
        self,
        bundle: Bundle,
        role: str = "onnx_int8",
        providers: Sequence[str] | None = None,
        threads: int | None = None,
        conf: float | None = None,
        iou: float | None = None,
        workers: int | None = None,
    ) -> None:
        self.role = role
        self.path: Path = bundle.path(role)
        self._configure(bundle, conf, iou)
        self._providers_wanted = list(providers) if providers else None
        self._threads = threads
        if workers is not None and workers < 1:
            raise DetectorError(f"workers must be >= 1, got {workers}")
        self._workers_wanted = workers
        self.workers = 1
        self._session: Any = None
        self._pool: queue.Queue[Any] = queue.Queue()
        self._executor: ThreadPoolExecutor | None = None
        self._fixed_batch: int | None = None
        self.provider = ""

    def load(self) -> None:
        import onnxruntime as ort

        from models.onnx_meta import check_against_manifest

        try:
            check_against_manifest(self.path, self.bundle.manifest)
        except Exception as exc:
            raise DetectorError(f"{self.path}: {exc}") from exc
        available = ort.get_available_providers()
        wanted = self._providers_wanted or [p for p in PROVIDER_PREFERENCE if p in available]
        missing = [p for p in wanted if p not in available]
        if missing:
            raise DetectorError(f"execution providers {missing} are not in this onnxruntime ({available})")
        cores = os.cpu_count() or 1
        on_cpu = wanted[0] == "CPUExecutionProvider"
        # On a CPU, N sessions of 1/N of the cores each run more frames per second than one
        # session with all of them (2 cores here: 22.3 against 18.1 frames/s): intra-op
        # parallelism leaves cores idle between operators. A GPU gets one session.
        workers = self._workers_wanted or (min(cores, 4) if on_cpu else 1)
        threads = self._threads or int(os.environ.get("LINEGUARD_ORT_THREADS", "0")) or max(1, cores // workers)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = threads
        try:
            sessions = [ort.InferenceSession(str(self.path), sess_options=opts, providers=wanted)
                        for _ in range(workers)]
        except Exception as exc:  # onnxruntime raises its own exception types
            raise DetectorError(f"cannot load ONNX model {self.path}: {exc}") from exc
        self._session = sessions[0]
        for sess in sessions:
            self._pool.put(sess)
        self.workers = workers
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="ort") if workers > 1 else None
        self.provider = self._session.get_providers()[0]
        inp = self._session.get_inputs()[0]
        self._input_name = inp.name
        self._fixed_batch = inp.shape[0] if isinstance(inp.shape[0], int) else None
        log.info(
            "model %s v%s (%s) on %s (%d session(s) x %d thread(s)), input %s, classes %s",
            self.bundle.manifest.name, self.version, self.role, self.provider, workers, threads,
            self.input_size, self.classes,
        )
        # Warm-up: the first run allocates and plans; keep it out of the first frame's latency.
        self.detect([np.full((self.input_size[0], self.input_size[1], 3), 114, np.uint8)])

    def detect(self, frames: Sequence[np.ndarray]) -> list[Detections]:
        if self._session is None:
            raise DetectorError("detect() called before load()")
        if not frames:
            return []
        if self._executor is not None and len(frames) > 1:
            return self.detect_prepared([self.prepare(f) for f in frames])
        batch, infos = preprocess_batch(list(frames), self.input_size)
        return self._run(batch, infos)

    def prepare(self, image: np.ndarray) -> Prepared:
        """Letterbox to RGB CHW float32 in [0, 1], what ONNX Runtime takes."""
        batch, infos = preprocess_batch([image], self.input_size)
        return Prepared(batch[0], infos[0])

    def detect_prepared(self, items: Sequence[Prepared]) -> list[Detections]:
        if self._session is None:
            raise DetectorError("detect_prepared() called before load()")
        if not items:
            return []
        if self._executor is not None and len(items) > 1:  # split the batch over the sessions
            n = min(self.workers, len(items))
            bounds = [round(i * len(items) / n) for i in range(n + 1)]
            parts = [items[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
            futures = [self._executor.submit(self._run_prepared, part) for part in parts]
            return [d for f in futures for d in f.result()]
        return self._run_prepared(items)

    def _run_prepared(self, items: Sequence[Prepared]) -> list[Detections]:
        batch = items[0].data[None] if len(items) == 1 else np.stack([p.data for p in items])
        return self._run(batch, [_letterboxed(p) for p in items])

    def _run(self, batch: np.ndarray, infos: list[LetterboxInfo]) -> list[Detections]:
        session = self._pool.get()  # thread-safe: each call has a session of its own
        try:
            if self._fixed_batch in (None, len(batch)):
                raw = session.run(None, {self._input_name: batch})[0]
            else:  # a model exported with a fixed batch size: run frame by frame
                raw = np.concatenate([session.run(None, {self._input_name: batch[i : i + 1]})[0]
                                      for i in range(len(batch))])
        finally:
            self._pool.put(session)
        return postprocess(raw, infos, conf=self.conf, iou=self.iou, max_det=self.max_det)


def _letterboxed(p: Prepared) -> LetterboxInfo:
    if p.info is None:
        raise DetectorError("frame was not prepared by this detector (no letterbox info)")
    return p.info


def detect_pipelined(detector: Detector, batches: Iterable[Sequence[Prepared]],
                     depth: int | None = None) -> Iterator[list[Detections]]:
    """``detector.detect_prepared`` over ``batches`` with up to ``depth`` batches in flight
    (default: the detector's session count), results yielded in input order. For one stream
    played through every frame (replay, benchmarks), where a batch is one frame."""
    workers: int = getattr(detector, "workers", 1)
    depth = depth or workers
    if depth <= 1:
        for items in batches:
            yield detector.detect_prepared(items)
        return
    pending: deque[Future[list[Detections]]] = deque()
    with ThreadPoolExecutor(depth, thread_name_prefix="pipeline") as pool:
        for items in batches:
            pending.append(pool.submit(detector.detect_prepared, items))
            if len(pending) >= depth:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
