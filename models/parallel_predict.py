"""Predict a dataset split with an ONNX model over several worker processes, and keep the result.

The retraining job scores whole dataset splits with INT8 models (a split bundle's two parts as one
:class:`SplitModel`) on the hub's CPU (release: the job's
validation split twice; gate: the golden set and the reviewed data, candidate and production).
One ONNX Runtime session does not use a many-core host well on a YOLOv8n-sized graph (the gate
took 63 s on a 16-core host and 58 s on 2 cores), so the split is cut into chunks that worker
processes predict, each with its own session and a share of the cores. Workers are spawned, not
forked: the job's process has torch loaded, and a forked OpenMP runtime can hang.
:func:`predict_many` runs several (model, samples) passes over one pool: a job's passes (the
release's two, the gate's three to five) then share one spawn and no core idles between passes.

:class:`DetectionCache` keeps a model's detections on a dataset (keyed by the model file's
SHA-256, the dataset's fingerprint and the prediction settings): production's figures on the
golden set do not change between weekly jobs, so the gate predicts them once.

:class:`ScoringPool` keeps one pool of workers over several calls (a retraining job's release and
gate): the workers are spawned once, while the caller does other work (they start loading ONNX
Runtime when the pool opens), and a worker keeps its sessions: the candidate the release scored
is not loaded again for the gate.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from models.bundle import sha256_file
from models.dataset_io import Sample
from models.detections import Detections
from models.fsutil import atomic_write_bytes

__all__ = ["DetectionCache", "ModelRef", "PendingPredictions", "ScoringPool", "SplitModel", "default_workers",
           "predict_many", "predict_many_later", "predict_samples"]

log = logging.getLogger(__name__)

_CHUNK = 16


def default_workers(cpus: int | None = None) -> int:
    """Processes for a scoring pass: 1 below 4 cores (one session uses them), else half the cores, at most 8."""
    n = (os.cpu_count() or 1) if cpus is None else cpus
    return 1 if n < 4 else min(8, n // 2)


@dataclass(frozen=True)
class SplitModel:
    """A split bundle's two INT8 parts predicted as one model: edge part -> wire codes -> hub part."""

    edge: Path
    hub: Path
    imgsz: tuple[int, int]


ModelRef = Path | SplitModel


def _predictor(model: ModelRef, multi_label: bool, threads: int | None) -> Any:
    if isinstance(model, SplitModel):
        from models.split_runtime import SplitEdgeRunner, SplitHubRunner, SplitPredictor

        return SplitPredictor(SplitEdgeRunner(model.edge, threads=threads), SplitHubRunner(model.hub, threads=threads),
                              model.imgsz, multi_label=multi_label)
    from models.onnx_predict import OnnxPredictor

    return OnnxPredictor(model, multi_label=multi_label, intra_op_threads=threads)


_predictors: dict[tuple[Any, ...], Any] = {}  # a worker's sessions, by model file (path, size, mtime)
_threads: int | None = None  # a worker's ONNX Runtime threads


def _init(threads: int) -> None:
    global _threads
    _threads = threads


def _warm() -> None:
    """A worker's first task in a :class:`ScoringPool`: load what every pass needs."""
    import models.onnx_predict  # noqa: F401  (onnxruntime, OpenCV)


class ScoringPool:
    """``with ScoringPool(workers) as pool: predict_many(..., pool=pool)``: ``workers`` spawned
    processes (at least 2; each with its share of the cores as ONNX Runtime threads), started and
    warmed up at once; :meth:`close` (or leaving the ``with``) stops them."""

    def __init__(self, workers: int | None = None) -> None:
        self.workers = max(2, default_workers() if workers is None else int(workers))
        self.threads = max(1, (os.cpu_count() or self.workers) // self.workers)
        self._pool: ProcessPoolExecutor | None = ProcessPoolExecutor(
            self.workers, mp_context=get_context("spawn"), initializer=_init, initargs=(self.threads,))
        # one task per worker: the executor spawns a process for each task no idle worker takes
        for _ in range(self.workers):
            self._pool.submit(_warm)

    @property
    def executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            raise RuntimeError("the scoring pool is closed")
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> ScoringPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _run(model: ModelRef, multi_label: bool, samples: Sequence[Sample], conf: float, iou: float) -> list[Detections]:
    """One chunk in a worker; the worker keeps one session per model it has been given."""
    files = (model.edge, model.hub) if isinstance(model, SplitModel) else (model,)
    # a pool outlives a call: a file written again at the same path is another model
    key = (model, multi_label, *((st.st_size, st.st_mtime_ns) for st in map(os.stat, files)))
    predict = _predictors.get(key)
    if predict is None:
        predict = _predictors[key] = _predictor(model, multi_label, _threads)
    frames = [s.read() for s in samples]
    return [d.filter(conf) for d in predict(frames, conf=conf, iou=iou)]


def predict_samples(model: ModelRef, samples: Sequence[Sample], *, conf: float = 0.001, iou: float = 0.7,
                    multi_label: bool = True, workers: int | None = None,
                    progress: bool = False) -> list[Detections]:
    """One :class:`Detections` per sample, in order (as :func:`models.evaluate.predict_split` with an
    ``OnnxPredictor``, or a ``SplitPredictor`` for a :class:`SplitModel`); ``workers`` processes
    (default :func:`default_workers`), 1 = in this process."""
    return predict_many([(model, samples)], conf=conf, iou=iou, multi_label=multi_label, workers=workers,
                        progress=progress)[0]


def predict_many(jobs: Sequence[tuple[ModelRef, Sequence[Sample]]], *, conf: float = 0.001, iou: float = 0.7,
                 multi_label: bool = True, workers: int | None = None, pool: ScoringPool | None = None,
                 progress: bool = False) -> list[list[Detections]]:
    """:func:`predict_samples` for several (model, samples) jobs over **one** pool of workers: the
    chunks of every job are queued together, so the cores stay busy to the end of the last job and
    the workers are spawned once (each loads a model when it first gets one of its chunks). With
    ``pool`` (``workers`` is then the pool's), its workers do it and stay for the next call.
    Returns one list per job, in order."""
    total = sum(len(samples) for _, samples in jobs)
    if pool is not None:
        return _predict_chunks(pool.executor, jobs, conf, iou, multi_label, progress)
    workers = default_workers() if workers is None else max(1, int(workers))
    workers = min(workers, max(1, -(-total // _CHUNK)))
    if workers == 1:
        from models.evaluate import predict_split

        return [predict_split(_predictor(model, multi_label, None), samples, conf=conf, iou=iou, progress=progress)
                for model, samples in jobs]
    threads = max(1, (os.cpu_count() or workers) // workers)
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_init,
                             initargs=(threads,)) as executor:
        return _predict_chunks(executor, jobs, conf, iou, multi_label, progress)


def predict_many_later(jobs: Sequence[tuple[ModelRef, Sequence[Sample]]], *, pool: ScoringPool, conf: float = 0.001,
                       iou: float = 0.7, multi_label: bool = True) -> PendingPredictions:
    """:func:`predict_many` on ``pool`` without waiting: every chunk is queued now (behind what the
    pool already has) and :meth:`PendingPredictions.result` collects them."""
    return PendingPredictions(pool.executor, jobs, conf, iou, multi_label)


class PendingPredictions:
    """Scoring passes queued on a pool's workers; :meth:`result` waits for them and returns one list
    of :class:`Detections` per job, in order."""

    def __init__(self, executor: ProcessPoolExecutor, jobs: Sequence[tuple[ModelRef, Sequence[Sample]]],
                 conf: float, iou: float, multi_label: bool) -> None:
        self._sizes = [len(samples) for _, samples in jobs]
        chunks = [(j, model, list(samples[i : i + _CHUNK]))
                  for j, (model, samples) in enumerate(jobs) for i in range(0, len(samples), _CHUNK)]
        self._owners = [j for j, _, _ in chunks]
        self._futures = [executor.submit(_run, model, multi_label, part, conf, iou) for _, model, part in chunks]

    def result(self, progress: bool = False) -> list[list[Detections]]:
        results = (f.result() for f in self._futures)  # in submission order: each job's chunks stay in order
        if progress:
            from tqdm import tqdm

            results = tqdm(results, total=len(self._futures), desc="evaluate", unit="chunk", file=sys.stderr)
        out: list[list[Detections]] = [[] for _ in self._sizes]
        for j, part in zip(self._owners, results, strict=True):
            out[j].extend(part)
        for n, dets in zip(self._sizes, out, strict=True):
            if len(dets) != n:  # pragma: no cover - every chunk comes back
                raise RuntimeError(f"{len(dets)} results for {n} frames")
        return out


def _predict_chunks(executor: ProcessPoolExecutor, jobs: Sequence[tuple[ModelRef, Sequence[Sample]]], conf: float,
                    iou: float, multi_label: bool, progress: bool) -> list[list[Detections]]:
    return PendingPredictions(executor, jobs, conf, iou, multi_label).result(progress)


class DetectionCache:
    """``cache.get(model, dataset_key, split, conf, iou, compute)``: detections stored under ``root``
    as ``.npz``, one file per (model SHA-256, dataset key, split, conf, iou); written atomically. A
    file that does not read back (truncated, another format) is recomputed and replaced."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, model: Path, dataset_key: str, split: str, conf: float, iou: float) -> Path:
        key = hashlib.sha256(f"{sha256_file(model)}|{dataset_key}|{split}|{conf!r}|{iou!r}".encode()).hexdigest()
        return self.root / f"{key[:32]}.npz"

    def lookup(self, model: Path, dataset_key: str, split: str, conf: float, iou: float) -> list[Detections] | None:
        """The stored detections, or None (none stored, or a file that does not read back)."""
        p = self.path(model, dataset_key, split, conf, iou)
        if not p.is_file():
            return None
        try:
            return _load(p)
        except (OSError, ValueError, KeyError) as e:
            log.warning("detection cache %s unreadable (%s): predicting again", p, e)
            return None

    def put(self, model: Path, dataset_key: str, split: str, conf: float, iou: float,
            dets: Sequence[Detections]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.path(model, dataset_key, split, conf, iou), _dump(dets))

    def get(self, model: Path, dataset_key: str, split: str, conf: float, iou: float,
            compute: Callable[[], list[Detections]]) -> tuple[list[Detections], bool]:
        """``(detections, hit)``."""
        dets = self.lookup(model, dataset_key, split, conf, iou)
        if dets is not None:
            return dets, True
        dets = compute()
        self.put(model, dataset_key, split, conf, iou, dets)
        return dets, False


def _dump(dets: Sequence[Detections]) -> bytes:
    import io

    counts = np.array([len(d) for d in dets], np.int64)
    cat = Detections.concat(list(dets)) if dets else Detections.empty()
    buf = io.BytesIO()
    np.savez(buf, counts=counts, boxes=cat.boxes, scores=cat.scores, class_ids=cat.class_ids,
             undecided=np.array([d.undecided for d in dets], bool))
    return buf.getvalue()


def _load(p: Path) -> list[Detections]:
    with np.load(p, allow_pickle=False) as z:
        counts, boxes, scores, cls, und = z["counts"], z["boxes"], z["scores"], z["class_ids"], z["undecided"]
    if int(counts.sum()) != len(boxes) or len(counts) != len(und):
        raise ValueError("counts do not match the stored detections")
    ends = np.cumsum(counts)
    return [Detections(boxes[e - n : e], scores[e - n : e], cls[e - n : e], undecided=bool(u))
            for n, e, u in zip(counts, ends, und, strict=True)]
