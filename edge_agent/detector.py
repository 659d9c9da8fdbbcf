"""Detector backends behind one small interface: ``load()`` then ``detect(frames)``.

:class:`OnnxDetector` runs a bundle's ONNX model with ONNX Runtime. It picks the best
execution provider the installed onnxruntime offers (TensorRT, CUDA, then CPU) unless told
otherwise, logs which one runs, and checks the ONNX metadata against the bundle manifest
before the first frame.
"""

from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from models.bundle import Bundle, Postprocessing
from models.detections import Detections
from models.processing import postprocess, preprocess_batch

__all__ = ["Detector", "OnnxDetector", "DetectorError"]

log = logging.getLogger(__name__)

PROVIDER_PREFERENCE = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


class DetectorError(RuntimeError):
    """A model that cannot be loaded or run; the message names the file."""


class Detector(ABC):
    """Runs a detection model on batches of BGR frames."""

    classes: list[str]
    input_size: tuple[int, int]
    version: str

    @abstractmethod
    def load(self) -> None:
        """Load and warm the model. Raises DetectorError with the file's name on failure."""

    @abstractmethod
    def detect(self, frames: Sequence[np.ndarray]) -> list[Detections]:
        """One :class:`Detections` per frame, boxes in that frame's pixel coordinates."""


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
    ) -> None:
        self.bundle = bundle
        self.role = role
        self.path: Path = bundle.path(role)
        manifest = bundle.manifest
        self.classes = list(manifest.classes)
        self.input_size = (int(manifest.input_size[0]), int(manifest.input_size[1]))
        self.version = manifest.version
        post: Postprocessing | dict[str, Any] = manifest.postprocessing or {}
        self.conf = float(conf if conf is not None else post.get("operating_conf", post.get("conf", 0.25)))
        self.iou = float(iou if iou is not None else post.get("iou", 0.7))
        self.max_det = int(post.get("max_det", 300))
        self._providers_wanted = list(providers) if providers else None
        self._threads = threads
        self._session: Any = None
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
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        threads = self._threads or int(os.environ.get("LINEGUARD_ORT_THREADS", "0"))
        if threads:
            opts.intra_op_num_threads = threads
        try:
            self._session = ort.InferenceSession(str(self.path), sess_options=opts, providers=wanted)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise DetectorError(f"cannot load ONNX model {self.path}: {exc}") from exc
        self.provider = self._session.get_providers()[0]
        inp = self._session.get_inputs()[0]
        self._input_name = inp.name
        self._fixed_batch = inp.shape[0] if isinstance(inp.shape[0], int) else None
        log.info(
            "model %s v%s (%s) on %s, input %s, classes %s",
            self.bundle.manifest.name, self.version, self.role, self.provider, self.input_size, self.classes,
        )
        # Warm-up: the first run allocates and plans; keep it out of the first frame's latency.
        self.detect([np.full((self.input_size[0], self.input_size[1], 3), 114, np.uint8)])

    def detect(self, frames: Sequence[np.ndarray]) -> list[Detections]:
        if self._session is None:
            raise DetectorError("detect() called before load()")
        if not frames:
            return []
        batch, infos = preprocess_batch(list(frames), self.input_size)
        if self._fixed_batch in (None, len(frames)):
            raw = self._session.run(None, {self._input_name: batch})[0]
        else:  # a model exported with a fixed batch size: run frame by frame
            raw = np.concatenate([self._session.run(None, {self._input_name: batch[i : i + 1]})[0]
                                  for i in range(len(frames))])
        return postprocess(raw, infos, conf=self.conf, iou=self.iou, max_det=self.max_det)
