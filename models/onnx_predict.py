"""Run an Ultralytics-exported YOLO ONNX detector with onnxruntime on BGR frames (no torch)."""

from __future__ import annotations

import ast
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from models.detections import Detections
from models.processing import postprocess, preprocess_batch

__all__ = ["OnnxPredictor"]


def _literal(text: str | None) -> Any:
    if not text:
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return None


class OnnxPredictor:
    """``predictor(frames) -> list[Detections]`` for a ``(B, 3, H, W) -> (B, 4 + nc, A)`` ONNX model.

    The input size comes from the model's input shape; when that is dynamic, from the Ultralytics
    ``imgsz`` metadata, else from ``imgsz``. A model with a fixed batch of 1 is run frame by frame;
    a dynamic batch runs up to ``max_batch`` frames per session call.
    """

    def __init__(
        self,
        model_path: str | Path,
        *,
        conf: float = 0.25,
        iou: float = 0.7,
        max_det: int = 300,
        agnostic: bool = False,
        multi_label: bool = False,
        intra_op_threads: int | None = None,
        imgsz: int | tuple[int, int] | None = None,
        max_batch: int = 16,
        providers: Sequence[str] = ("CPUExecutionProvider",),
    ) -> None:
        self.model_path = Path(model_path)
        self.conf, self.iou, self.max_det = conf, iou, max_det
        self.agnostic, self.multi_label = agnostic, multi_label
        opts = ort.SessionOptions()
        if intra_op_threads:
            opts.intra_op_num_threads = int(intra_op_threads)
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(
            str(self.model_path), sess_options=opts, providers=list(providers)
        )
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.output_name = self.session.get_outputs()[0].name
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)
        shape = list(inp.shape)
        if len(shape) != 4:
            raise ValueError(f"{self.model_path}: expected a 4-D NCHW input, got shape {shape}")
        b, _, h, w = shape
        self.fixed_batch: int | None = b if isinstance(b, int) and b > 0 else None
        if isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0:
            self.imgsz: tuple[int, int] = (h, w)
        else:
            meta = _literal(self.metadata.get("imgsz"))
            size = imgsz if imgsz is not None else meta if meta is not None else 640
            self.imgsz = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        self.max_batch = self.fixed_batch or max(1, int(max_batch))
        names = _literal(self.metadata.get("names"))
        self.names: list[str] | None = (
            [str(names[k]) for k in sorted(names)] if isinstance(names, dict) else None
        )

    def raw(self, batch: np.ndarray) -> np.ndarray:
        """Run the session on a preprocessed ``(N, 3, H, W)`` float32 batch, splitting as the model needs."""
        outs = []
        for i in range(0, len(batch), self.max_batch):
            chunk = batch[i : i + self.max_batch]
            if self.fixed_batch and len(chunk) < self.fixed_batch:  # pad a short last chunk
                pad = np.zeros((self.fixed_batch - len(chunk), *chunk.shape[1:]), chunk.dtype)
                out = self.session.run([self.output_name], {self.input_name: np.concatenate([chunk, pad])})[0]
                out = out[: len(chunk)]
            else:
                out = self.session.run([self.output_name], {self.input_name: chunk})[0]
            outs.append(out)
        return np.concatenate(outs) if len(outs) > 1 else outs[0]

    def __call__(
        self, frames: Sequence[np.ndarray], conf: float | None = None, iou: float | None = None
    ) -> list[Detections]:
        if len(frames) == 0:
            return []
        batch, infos = preprocess_batch(list(frames), self.imgsz)
        raw = self.raw(batch)
        return postprocess(
            raw,
            infos,
            conf=self.conf if conf is None else conf,
            iou=self.iou if iou is None else iou,
            max_det=self.max_det,
            agnostic=self.agnostic,
            multi_label=self.multi_label,
        )
