"""Picks the detector backend for this host.

``auto``: PyTorch FP16 when torch sees a CUDA device and the bundle carries its checkpoint and
ultralytics is installed (a T4 or Jetson box with the full stack), otherwise ONNX Runtime with the
best execution provider it has (TensorRT, CUDA, then CPU). ``onnxruntime`` or ``torch`` force a
backend; forcing one that cannot run here is an error that says why, never a silent fallback.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence

from edge_agent.detector import Detector, DetectorError, OnnxDetector
from models.bundle import Bundle, load_bundle

__all__ = ["create_detector"]

log = logging.getLogger(__name__)


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a broken or blocked install counts as absent
        return False


def _torch_usable(bundle_dir: str) -> tuple[bool, str]:
    if not _installed("torch"):
        return False, "torch is not installed"
    if not _installed("ultralytics"):
        return False, "ultralytics is not installed"
    from edge_agent.torch_detector import torch_cuda_available

    if not torch_cuda_available():
        return False, "torch sees no CUDA device (ONNX Runtime INT8 is the faster CPU path)"
    try:
        load_bundle(bundle_dir, roles=("checkpoint",))
    except Exception as exc:
        return False, f"the bundle has no usable checkpoint ({exc})"
    return True, ""


def create_detector(
    bundle_dir: str,
    runtime: str = "auto",
    role: str = "onnx_int8",
    providers: Sequence[str] | None = None,
    conf: float | None = None,
    threads: int | None = None,
    workers: int | None = None,
) -> Detector:
    """A loaded-on-demand detector for ``bundle_dir`` (call ``.load()`` before ``.detect()``)."""
    if runtime not in ("auto", "onnxruntime", "torch"):
        raise DetectorError(f"unknown runtime {runtime!r}; expected auto, onnxruntime or torch")
    if runtime in ("auto", "torch"):
        ok, why = _torch_usable(bundle_dir)
        if ok:
            from edge_agent.torch_detector import TorchDetector

            bundle: Bundle = load_bundle(bundle_dir, roles=("checkpoint",))
            return TorchDetector(bundle, conf=conf)
        if runtime == "torch":
            raise DetectorError(f"runtime torch was asked for but cannot run here: {why}")
        log.info("runtime auto: ONNX Runtime (%s)", why)
    bundle = load_bundle(bundle_dir, roles=(role,))
    return OnnxDetector(bundle, role=role, providers=providers, threads=threads, conf=conf, workers=workers)
