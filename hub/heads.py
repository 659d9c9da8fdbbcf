"""The hub part of split bundles, one :class:`Head` per bundle version, loaded and warmed.

:func:`load_heads` reads bundles (file hashes checked) with the head runtime asked for (``onnx``:
the bundle's INT8 ``split_hub`` in ONNX Runtime; ``torch``: rebuilt from the checkpoint for a GPU
hub, :mod:`models.split_torch`) and warms each (:meth:`Head.warm`: a runtime's first run allocates,
a GPU's builds its kernels per batch size). :func:`bundles_dir_loader` is the head service's
loader of versions it was not started with. :class:`hub.head_service.HeadService` runs them.

Loading a torch head makes about 280,000 Python objects (torch, Ultralytics: 321,000 in the
process after one); a full collection of Python's cyclic garbage collector then scans them all,
202 ms on the H100 host with the interpreter lock held, and a load would set off several while
frames are being answered. So collections wait for a load (:func:`quiet_collector`), and what the
load made is moved out of the collector's sight (``gc.freeze``); :func:`release_unloaded` gives an
unloaded head's objects back to it.
"""

from __future__ import annotations

import gc
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.bundle import MANIFEST_FILE, Bundle, load_bundle
from models.detections import Detections
from models.feature_codec import FeatureSpec
from models.processing import postprocess
from models.split_runtime import SplitHubRunner

__all__ = ["HEAD_ROLES", "Head", "HeadLoader", "bundles_dir_loader", "load_heads", "quiet_collector",
           "release_unloaded"]

log = logging.getLogger(__name__)
HeadLoader = Callable[[str], "Head | None"]  # a bundle version -> its head, None when there is none
_VERSION = re.compile(r"^\d+\.\d+\.\d+$")
_gc_lock = threading.Lock()


class _Quiet:  # under _gc_lock
    loads = 0  # loads under way
    was_enabled = True  # whether the collector was on before the first of them


@contextmanager
def quiet_collector() -> Iterator[None]:
    """No automatic collection while the block runs (loads in several threads nest); when the last
    one leaves, everything alive is frozen (``gc.freeze``: never scanned again)."""
    with _gc_lock:
        if _Quiet.loads == 0:
            _Quiet.was_enabled = gc.isenabled()
            gc.disable()
        _Quiet.loads += 1
    try:
        yield
    finally:
        with _gc_lock:
            _Quiet.loads -= 1
            if _Quiet.loads == 0:
                gc.freeze()
                if _Quiet.was_enabled:
                    gc.enable()


def release_unloaded() -> float:
    """After heads were dropped: unfreeze, collect once (their cycles), freeze again; the ms it took."""
    with _gc_lock:
        t0 = time.perf_counter()
        gc.unfreeze()
        gc.collect()
        gc.freeze()
        return 1000 * (time.perf_counter() - t0)


@dataclass
class Head:
    """The hub part of one bundle version."""

    version: str
    spec: FeatureSpec
    runner: Any  # .run(codes (N, C, h, w) uint8) -> raw (N, 4 + nc, anchors); optionally .detect(...)
    conf: float
    iou: float
    max_det: int
    input_size: tuple[int, int]
    frame_ms: float = 0.0  #: run time per frame, measured (:meth:`warm`, then every batch)

    @classmethod
    def from_bundle(cls, bundle: Bundle, threads: int | None = None, *, runtime: str = "onnx",
                    device: str = "cuda", half: bool = True) -> Head:
        split = bundle.manifest.split
        if split is None:
            raise ValueError(f"bundle {bundle.dir} has no split parts")
        spec = FeatureSpec.from_dict(split["spec"])
        imgsz = (int(bundle.manifest.input_size[0]), int(bundle.manifest.input_size[1]))
        runner: Any
        if runtime == "torch":  # a GPU hub: the same part rebuilt in torch, NMS on the device
            from models.split_torch import TorchSplitHub

            runner = TorchSplitHub(bundle.path("checkpoint"), bundle.path("split_bottleneck"), spec,
                                   version=bundle.manifest.version, imgsz=imgsz, device=device, half=half)
        else:
            runner = SplitHubRunner(bundle.path("split_hub"), spec, version=bundle.manifest.version, threads=threads)
        post = bundle.manifest.postprocessing
        conf = post.get("operating_conf") or post.conf  # the agent filters at its own threshold
        return cls(bundle.manifest.version, spec, runner, float(conf), float(post.iou), int(post.max_det), imgsz)

    def detect(self, codes: np.ndarray) -> list[Detections]:
        """Boxes in model-input pixels, one :class:`Detections` per row of ``codes``."""
        if hasattr(self.runner, "detect"):
            return self.runner.detect(codes, conf=self.conf, iou=self.iou, max_det=self.max_det)
        raw = self.runner.run(codes)
        return postprocess(raw, [None] * len(codes), conf=self.conf, iou=self.iou, max_det=self.max_det)

    def warm(self, max_batch: int = 1) -> float:
        """Run frames of zeros once at every batch size the runner keeps kernels for (its
        ``batch_buckets`` up to ``max_batch``; else one frame): a runtime's first run allocates, a
        GPU's builds its kernels per size. Then one frame, timed, is :attr:`frame_ms`. Returns the
        warm-up's ms."""
        sizes = [n for n in getattr(self.runner, "batch_buckets", ()) if n <= max_batch] or [1]
        t0 = time.perf_counter()
        for n in sizes:
            self.detect(np.zeros((n, *self.spec.shape), np.uint8))
        t1 = time.perf_counter()
        self.detect(np.zeros((1, *self.spec.shape), np.uint8))
        self.frame_ms = 1000 * (time.perf_counter() - t1)
        return 1000 * (t1 - t0)


#: bundle roles each head runtime reads
HEAD_ROLES = {"onnx": ("split_hub",), "torch": ("checkpoint", "split_bottleneck")}


def load_heads(bundle_dirs: list[Path], threads: int | None = None, *, runtime: str = "onnx",
               device: str = "cuda", half: bool = True, max_batch: int = 32) -> dict[str, Head]:
    """Load and warm (:meth:`Head.warm`, up to ``max_batch``) each bundle's head."""
    if runtime not in HEAD_ROLES:
        raise ValueError(f"head runtime {runtime!r}: expected one of {sorted(HEAD_ROLES)}")
    heads: dict[str, Head] = {}
    for d in bundle_dirs:
        with quiet_collector():
            head = Head.from_bundle(load_bundle(d, roles=HEAD_ROLES[runtime]), threads, runtime=runtime,
                                    device=device, half=half)
            if head.version in heads:
                raise ValueError(f"two bundles with version {head.version}: {d}")
            heads[head.version] = head
            warm_ms = head.warm(max_batch)
        log.info("head for bundle %s: cut %d, codes %s at %d bits (%s); warm-up %.0f ms, then %.1f ms a frame",
                 head.version, head.spec.cut, head.spec.shape, head.spec.bits, head.runner.provider, warm_ms,
                 head.frame_ms)
    return heads


def bundles_dir_loader(bundles_dir: Path, threads: int | None = None, *, runtime: str = "onnx",
                       device: str = "cuda", half: bool = True, max_batch: int = 32) -> HeadLoader:
    """A :data:`HeadLoader` reading ``bundles_dir/<version>`` (file hashes checked); None for a
    version that is not a plain ``X.Y.Z``, has no directory there, or whose manifest says another."""

    def load(version: str) -> Head | None:
        d = Path(bundles_dir) / version
        if not _VERSION.match(version) or not (d / MANIFEST_FILE).is_file():
            return None
        head = load_heads([d], threads, runtime=runtime, device=device, half=half, max_batch=max_batch).get(version)
        if head is None:
            log.error("bundle %s does not say version %s: not loaded", d, version)
        return head

    return load
