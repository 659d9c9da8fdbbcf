"""PyTorch backend: the bundle's checkpoint on CUDA in FP16 (or on the CPU in FP32, for tests).

Only for hosts that have torch *and* ultralytics installed (the checkpoint pickles Ultralytics'
module classes) and the checkpoint file in their bundle; camera stations without them use
:class:`~edge_agent.detector.OnnxDetector`. Pre- and post-processing are the same functions the
ONNX path uses, so both backends see identical tensors and decode identically.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from edge_agent.detector import Detector, DetectorError
from models.bundle import Bundle
from models.detections import Detections
from models.processing import postprocess, preprocess_batch

__all__ = ["TorchDetector", "torch_cuda_available"]

log = logging.getLogger(__name__)


def torch_cuda_available() -> bool:
    """True when torch imports and sees a CUDA device (never raises)."""
    try:
        import torch
    except Exception:
        return False
    return bool(torch.cuda.is_available())


class TorchDetector(Detector):
    def __init__(self, bundle: Bundle, device: str | None = None, half: bool | None = None,
                 conf: float | None = None, iou: float | None = None) -> None:
        self.bundle = bundle
        manifest = bundle.manifest
        self.classes = list(manifest.classes)
        self.input_size = (int(manifest.input_size[0]), int(manifest.input_size[1]))
        self.version = manifest.version
        post: dict[str, Any] = manifest.postprocessing.model_dump()
        self.conf = float(conf if conf is not None else post.get("operating_conf", post.get("conf", 0.25)))
        self.iou = float(iou if iou is not None else post.get("iou", 0.7))
        self.max_det = int(post.get("max_det", 300))
        self._device_wanted = device
        self._half_wanted = half
        self._model: Any = None
        self.provider = ""

    def load(self) -> None:
        try:
            import torch

            from models.offline import configure_offline

            configure_offline()
            import ultralytics  # noqa: F401 - the checkpoint unpickles its classes
        except ImportError as exc:
            raise DetectorError(f"the torch runtime needs torch and ultralytics installed: {exc}") from exc
        path = self.bundle.path("checkpoint")
        device = self._device_wanted or ("cuda:0" if torch.cuda.is_available() else "cpu")
        half = self._half_wanted if self._half_wanted is not None else device.startswith("cuda")
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
            model = (ckpt.get("ema") or ckpt["model"]).float()
            model = model.fuse() if hasattr(model, "fuse") else model
            model = model.to(device).eval()
            if half:
                model = model.half()
        except Exception as exc:
            raise DetectorError(f"cannot load checkpoint {path}: {exc}") from exc
        names = getattr(model, "names", None)
        if isinstance(names, dict) and [names[i] for i in sorted(names)] != self.classes:
            raise DetectorError(f"{path}: classes {names} differ from the manifest's {self.classes}")
        self._torch, self._model, self._device, self._half = torch, model, device, half
        self.provider = f"torch:{device}:{'fp16' if half else 'fp32'}"
        log.info("model %s v%s on %s", self.bundle.manifest.name, self.version, self.provider)
        self.detect([np.full((self.input_size[0], self.input_size[1], 3), 114, np.uint8)])

    def detect(self, frames: Sequence[np.ndarray]) -> list[Detections]:
        if self._model is None:
            raise DetectorError("detect() called before load()")
        if not frames:
            return []
        torch = self._torch
        batch, infos = preprocess_batch(list(frames), self.input_size)
        with torch.inference_mode():
            x = torch.from_numpy(batch).to(self._device, non_blocking=True)
            x = x.half() if self._half else x
            out = self._model(x)
            raw = (out[0] if isinstance(out, (list, tuple)) else out).float().cpu().numpy()
        return postprocess(raw, infos, conf=self.conf, iou=self.iou, max_det=self.max_det)
