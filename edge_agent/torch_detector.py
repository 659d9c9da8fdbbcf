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

from edge_agent.detector import Detector, DetectorError, Prepared, _letterboxed
from models.bundle import Bundle
from models.detections import Detections
from models.processing import letterbox, postprocess

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
        self._configure(bundle, conf, iou)
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

    def prepare(self, image: np.ndarray) -> Prepared:
        """Letterbox only (uint8 HWC BGR): colour order, layout and scaling happen on the GPU,
        so each frame crosses the bus as a quarter of the float32 bytes."""
        boxed, info = letterbox(image, self.input_size)
        return Prepared(boxed, info)

    def detect(self, frames: Sequence[np.ndarray]) -> list[Detections]:
        return self.detect_prepared([self.prepare(f) for f in frames])

    def detect_prepared(self, items: Sequence[Prepared]) -> list[Detections]:
        if self._model is None:
            raise DetectorError("detect() called before load()")
        if not items:
            return []
        torch = self._torch
        batch = np.stack([p.data for p in items])  # (B, H, W, 3) uint8 BGR
        with torch.inference_mode():
            x = torch.from_numpy(batch).to(self._device, non_blocking=True)
            x = x.flip(-1).permute(0, 3, 1, 2)  # BGR HWC -> RGB CHW
            x = (x.half() if self._half else x.float()).div_(255.0).contiguous()
            out = self._model(x)
            raw = (out[0] if isinstance(out, (list, tuple)) else out).float().cpu().numpy()
        return postprocess(raw, [_letterboxed(p) for p in items], conf=self.conf, iou=self.iou,
                           max_det=self.max_det)
