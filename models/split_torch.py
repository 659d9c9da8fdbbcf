"""The hub part of a split bundle run in torch, for a GPU hub (the ``train`` extra: torch, ultralytics).

ONNX Runtime on the CPU is the default head runner (:class:`models.split_runtime.SplitHubRunner`).
On a hub with a CUDA GPU, :class:`TorchSplitHub` rebuilds the same hub part in torch from the
bundle's ``checkpoint`` and ``split_bottleneck`` (the trained bottleneck, with the hub-side layer
weights it tuned), runs it under FP16 autocast and does the box filtering and class-aware NMS on
the GPU as well (``torchvision.ops.batched_nms``), so that only the surviving boxes cross back to
the host. A batch is padded up to the next of :data:`BATCH_BUCKETS`: each batch size's first run
builds its kernels (150-330 ms on an H100, against 11-12 ms after), so a head warms every bucket
it will run once, at load, and never meets a new size while serving. Semantics are
:func:`models.processing.postprocess`'s (best class only, score strictly
above ``conf``, 30000 candidates at most, top ``max_det``); boxes stay in model-input pixels.

The bundle's files are verified (SHA-256, signature) by :func:`models.bundle.load_bundle` before
this reads them; the bottleneck file is loaded with ``weights_only=True`` (tensors and plain data,
no pickled code).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from models.detections import Detections
from models.feature_codec import FeatureSpec
from models.split_runtime import SplitMismatchError

__all__ = ["BATCH_BUCKETS", "TorchSplitHub"]

_MAX_CANDIDATES = 30000
#: the batch sizes run (a batch is padded up to the next; a larger one runs as it is)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class TorchSplitHub:
    """``run(codes) -> raw (N, 4 + nc, anchors)`` and ``detect(codes, ...) -> list[Detections]``."""

    def __init__(self, checkpoint: Path, bottleneck: Path, spec: FeatureSpec, *, version: str,
                 imgsz: tuple[int, int], device: str = "cuda", half: bool = True) -> None:
        from models.bottleneck import SplitHub, crossing_channels, detection_model, spec_for
        from models.offline import configure_offline, patch_ultralytics

        configure_offline()
        from ultralytics import YOLO

        from models.split_train import apply_hub_tuning, load_bottleneck

        patch_ultralytics()
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("heads.device is cuda but torch sees no CUDA device")
        bn, info = load_bottleneck(bottleneck)
        model = YOLO(str(checkpoint), task="detect").model
        apply_hub_tuning(model, info)
        det = detection_model(model).float().eval()
        for m in det.modules():  # plain tensor output from Detect, as in the ONNX export
            if hasattr(m, "export"):
                m.export = True
            if hasattr(m, "format"):
                m.format = "onnx"
        mine = spec_for(int(info["cut"]), bn, crossing_channels(det, int(info["cut"]), imgsz))
        if mine.to_dict() != spec.to_dict():
            raise SplitMismatchError(f"bundle {version}: the bottleneck file gives spec {mine.to_dict()}, "
                                     f"the manifest says {spec.to_dict()}")
        self.spec, self.version = spec, version
        self.half = half and self.device.type == "cuda"
        self.hub = SplitHub(det, int(info["cut"]), bn).to(self.device).eval()
        for p in self.hub.parameters():
            p.requires_grad_(False)
        self.provider = f"torch {self.device}" + (" fp16" if self.half else " fp32")
        #: padded batch sizes (on a GPU; a CPU runs any size as it is)
        self.batch_buckets: tuple[int, ...] = BATCH_BUCKETS if self.device.type == "cuda" else ()

    @torch.inference_mode()
    def _forward(self, codes: np.ndarray) -> torch.Tensor:
        if codes.ndim != 4 or tuple(codes.shape[1:]) != self.spec.shape or codes.dtype != np.uint8:
            raise SplitMismatchError(f"codes {codes.dtype} {codes.shape[1:]}, head expects uint8 {self.spec.shape}")
        n = len(codes)
        x = torch.from_numpy(np.ascontiguousarray(codes)).to(self.device, non_blocking=True)
        size = next((b for b in self.batch_buckets if b >= n), n)
        if size > n:
            x = torch.cat([x, x.new_zeros((size - n, *x.shape[1:]))])
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.half):
            out = self.hub(x)
        return out[:n].float()

    def run(self, codes: np.ndarray) -> np.ndarray:
        return self._forward(codes).cpu().numpy()

    @torch.inference_mode()
    def detect(self, codes: np.ndarray, *, conf: float, iou: float, max_det: int) -> list[Detections]:
        """The whole batch is filtered and suppressed at once (one NMS call, images and classes kept
        apart by the index), and copied to the host once: per-frame Python and kernel-launch costs
        would otherwise bound the head long before the GPU does."""
        from torchvision.ops import batched_nms

        preds = self._forward(codes).transpose(1, 2)  # (N, A, 4 + nc)
        n, anchors, nc = preds.shape[0], preds.shape[1], preds.shape[2] - 4
        scores, cls = preds[..., 4:].max(2)  # (N, A)
        if anchors > _MAX_CANDIDATES:  # as postprocess: the best 30000 per image enter NMS
            top = scores.topk(_MAX_CANDIDATES, dim=1).indices
            preds = preds.gather(1, top[..., None].expand(-1, -1, preds.shape[2]))
            scores, cls = scores.gather(1, top), cls.gather(1, top)
        img, anchor = (scores > conf).nonzero(as_tuple=True)
        p, s, c = preds[img, anchor], scores[img, anchor], cls[img, anchor]
        xy, wh = p[:, :2], p[:, 2:4] / 2
        boxes = torch.cat([xy - wh, xy + wh], 1)
        keep = batched_nms(boxes, s, img * nc + c, iou)  # by score, descending
        rows = torch.cat([boxes[keep], s[keep, None], c[keep, None].float(), img[keep, None].float()], 1)
        host = rows.cpu().numpy()
        out = []
        for i in range(n):
            r = host[host[:, 6] == i][:max_det]
            out.append(Detections(r[:, :4].astype(np.float32), r[:, 4].astype(np.float32), r[:, 5].astype(np.int32)))
        return out
