"""Run the two ONNX parts of a split bundle with ONNX Runtime (no torch).

:class:`SplitEdgeRunner` turns a preprocessed batch into ``uint8`` codes, :class:`SplitHubRunner`
turns codes into the detector's raw output, and both check the ``lineguard.split`` metadata of
their file against the :class:`~models.feature_codec.FeatureSpec` they are given (from the
manifest), so a part from another bundle or another bottleneck is refused at load.
:class:`SplitPredictor` chains them through the wire codec (encode, decode) for evaluation and
the split report: ``predictor(frames) -> list[Detections]``, counting the bytes it would send.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from models.detections import Detections
from models.feature_codec import FeatureSpec, decode_codes, encode_codes
from models.processing import postprocess, preprocess_batch

__all__ = ["SplitEdgeRunner", "SplitHubRunner", "SplitMismatchError", "SplitPredictor", "read_split_spec"]


class SplitMismatchError(ValueError):
    """A split part whose embedded spec disagrees with the one it is run with."""


def _session(path: Path, threads: int | None, providers: Sequence[str] | None, spin: bool = True) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = int(threads)
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if not spin:
        # No busy-waiting between runs. The head service's session shares its cores with the MQTT
        # threads and, on a loopback test, with the agent: with both spinning, each one's idle threads
        # took the cores from the other (2026-11-23, 2 cores, one process: edge part 24.7 -> 16.0 ms,
        # head 55 -> 40 ms once neither spun).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not providers:  # CUDA where this onnxruntime has it (a GPU hub with onnxruntime-gpu), else CPU
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                     if p in ort.get_available_providers()]
    return ort.InferenceSession(str(path), sess_options=opts, providers=list(providers))


def read_split_spec(path: str | Path, session: Any = None) -> tuple[FeatureSpec, str, str]:
    """``(spec, role, bundle_version)`` embedded in a split part's metadata."""
    sess = session or _session(Path(path), 1, None)
    meta = dict(sess.get_modelmeta().custom_metadata_map)
    raw = meta.get("lineguard.split")
    if raw is None:
        raise SplitMismatchError(f"{path}: no lineguard.split metadata: not a split part")
    info = json.loads(raw)
    return FeatureSpec.from_dict(info), str(info.get("role", "")), meta.get("lineguard.bundle_version", "")


class _Part:
    role_prefix = ""
    spin = True

    def __init__(self, path: str | Path, spec: FeatureSpec | None = None, *, version: str | None = None,
                 threads: int | None = None, providers: Sequence[str] | None = None) -> None:
        self.path = Path(path)
        self.session = _session(self.path, threads, providers, self.spin)
        embedded, role, embedded_version = read_split_spec(self.path, self.session)
        if not role.startswith(self.role_prefix):
            raise SplitMismatchError(f"{self.path}: a {role!r} part, expected {self.role_prefix}*")
        if spec is not None and embedded != spec:
            raise SplitMismatchError(f"{self.path}: embedded split spec {embedded} differs from {spec}")
        if version is not None and embedded_version != version:
            raise SplitMismatchError(f"{self.path}: bundle version {embedded_version!r}, expected {version!r}")
        self.spec, self.version = embedded, embedded_version
        self.input_name = self.session.get_inputs()[0].name
        self.provider = self.session.get_providers()[0]


class SplitEdgeRunner(_Part):
    """Preprocessed ``(N, 3, H, W)`` float32 -> codes ``(N, C, h, w)`` uint8."""

    role_prefix = "split_edge"

    def run(self, batch: np.ndarray) -> np.ndarray:
        codes = self.session.run(None, {self.input_name: batch})[0]
        if codes.shape[1:] != self.spec.shape:
            raise SplitMismatchError(f"{self.path}: produced codes {codes.shape[1:]}, spec says {self.spec.shape}")
        return np.asarray(codes)


class SplitHubRunner(_Part):
    """Codes ``(N, C, h, w)`` uint8 -> the detector's raw output ``(N, 4 + nc, anchors)``."""

    role_prefix = "split_hub"
    spin = False  # see _session

    def run(self, codes: np.ndarray) -> np.ndarray:
        if codes.shape[1:] != self.spec.shape or codes.dtype != np.uint8:
            raise SplitMismatchError(f"codes {codes.dtype} {codes.shape[1:]}, spec says uint8 {self.spec.shape}")
        return np.asarray(self.session.run(None, {self.input_name: codes})[0])


class SplitPredictor:
    """Edge part -> wire codec -> hub part -> post-processing; ``bytes_sent`` per frame."""

    def __init__(self, edge: SplitEdgeRunner, hub: SplitHubRunner, imgsz: tuple[int, int], *, conf: float = 0.25,
                 iou: float = 0.7, max_det: int = 300, multi_label: bool = False) -> None:
        if edge.spec != hub.spec:
            raise SplitMismatchError(f"edge spec {edge.spec} differs from hub spec {hub.spec}")
        self.edge, self.hub, self.imgsz = edge, hub, imgsz
        self.conf, self.iou, self.max_det, self.multi_label = conf, iou, max_det, multi_label
        self.bytes_sent: list[int] = []

    def __call__(self, frames: Sequence[np.ndarray], conf: float | None = None,
                 iou: float | None = None) -> list[Detections]:
        if not frames:
            return []
        batch, infos = preprocess_batch(list(frames), self.imgsz)
        codes = self.edge.run(batch)
        received = []
        for c in codes:
            wire = encode_codes(c, self.edge.spec)
            self.bytes_sent.append(len(wire))
            received.append(decode_codes(wire, self.hub.spec))
        raw = self.hub.run(np.stack(received))
        return postprocess(raw, infos, conf=self.conf if conf is None else conf,
                           iou=self.iou if iou is None else iou, max_det=self.max_det, multi_label=self.multi_label)
