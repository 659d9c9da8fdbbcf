"""The head service: runs the hub side of split bundles for every agent in split mode.

Transport-agnostic core (the MQTT plumbing is :class:`hub.mqtt.HeadMqttWorker`):
:meth:`HeadService.submit` takes one raw feature message (with its topic); a worker thread takes
what has arrived, up to ``max_batch`` (waiting at most ``max_delay_ms`` once it has one: Triton's
queue-delay bound), groups it by bundle version, decodes each frame's codes, runs that version's
head once per group and post-processes; every frame gets one :class:`SplitResultPayload` through
``publish(topic, bytes)``.

- **Versions**: one :class:`Head` per deployed bundle (``heads.bundles``), and with a ``loader``
  (``heads.bundles_dir``: where the retraining job writes its bundles) the head of a version an
  agent asks for is loaded the first time it is asked for: a split agent that took an update is
  answered without a restart here (counted ``heads_loaded``; a version not found is looked for again
  after :data:`RETRY_MISSING_S`). The load runs in its own thread: frames of that version wait
  for it (their deadlines still hold), frames of every other version go on being answered.
  A message whose ``bundle_version`` has no head, or whose spec differs from that head's, is
  answered ``refused`` and counted (``refused_version``, ``refused_spec``), never decoded.
- **Dead letters**: a message that is not a feature message, or whose codes do not decode to its
  spec (truncated, corrupt), is kept in ``dead_letter_dir`` (the newest ``dead_letter_keep``) with
  its reason, counted, and not answered (the agent's deadline passes and it falls back).
- A message older than its ``deadline_ms`` when its turn comes is dropped (``expired``): the
  agent has stopped waiting for it.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lineguard_contract import ContractError, StationId, Topics
from lineguard_contract.features import (
    FeatureHeader,
    HeadDetection,
    SplitResultPayload,
    decode_features,
    encode_split_result,
)
from models.bundle import MANIFEST_FILE, Bundle, load_bundle
from models.detections import Detections
from models.feature_codec import FeatureDecodeError, FeatureSpec, decode_codes
from models.processing import postprocess
from models.split_runtime import SplitHubRunner

__all__ = ["HEAD_ROLES", "RETRY_MISSING_S", "Head", "HeadLoader", "HeadService", "bundles_dir_loader", "load_heads"]

log = logging.getLogger(__name__)
Publish = Callable[[str, bytes], None]
HeadLoader = Callable[[str], "Head | None"]  # a bundle version -> its head, None when there is none
RETRY_MISSING_S = 30.0  #: a version the loader did not find is looked for again after this long
_VERSION = re.compile(r"^\d+\.\d+\.\d+$")
_MISSING_KEEP = 1000  # versions remembered as not found, at most


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


#: bundle roles each head runtime reads
HEAD_ROLES = {"onnx": ("split_hub",), "torch": ("checkpoint", "split_bottleneck")}


def load_heads(bundle_dirs: list[Path], threads: int | None = None, *, runtime: str = "onnx",
               device: str = "cuda", half: bool = True) -> dict[str, Head]:
    if runtime not in HEAD_ROLES:
        raise ValueError(f"head runtime {runtime!r}: expected one of {sorted(HEAD_ROLES)}")
    heads: dict[str, Head] = {}
    for d in bundle_dirs:
        head = Head.from_bundle(load_bundle(d, roles=HEAD_ROLES[runtime]), threads, runtime=runtime,
                                device=device, half=half)
        if head.version in heads:
            raise ValueError(f"two bundles with version {head.version}: {d}")
        heads[head.version] = head
        log.info("head for bundle %s: cut %d, codes %s at %d bits (%s)", head.version, head.spec.cut,
                 head.spec.shape, head.spec.bits, head.runner.provider)
    return heads


def bundles_dir_loader(bundles_dir: Path, threads: int | None = None, *, runtime: str = "onnx",
                       device: str = "cuda", half: bool = True) -> HeadLoader:
    """A :data:`HeadLoader` reading ``bundles_dir/<version>`` (file hashes checked); None for a
    version that is not a plain ``X.Y.Z``, has no directory there, or whose manifest says another."""

    def load(version: str) -> Head | None:
        d = Path(bundles_dir) / version
        if not _VERSION.match(version) or not (d / MANIFEST_FILE).is_file():
            return None
        head = load_heads([d], threads, runtime=runtime, device=device, half=half).get(version)
        if head is None:
            log.error("bundle %s does not say version %s: not loaded", d, version)
        return head

    return load


@dataclass
class _Item:
    topic: str
    data: bytes
    received: float  # monotonic
    requeued: bool = False  # back from waiting for its version's head to load




class HeadService:
    """``start()``/``stop()`` the worker thread; ``submit(topic, data)`` from any thread."""

    def __init__(self, heads: dict[str, Head], publish: Publish, *, max_batch: int = 32, max_delay_ms: float = 5.0,
                 dead_letter_dir: Path | None = None, dead_letter_keep: int = 1000,
                 loader: HeadLoader | None = None) -> None:
        if not heads:
            raise ValueError("no heads: configure at least one split bundle")
        self.heads, self.publish, self.loader = heads, publish, loader
        self._missing: dict[str, float] = {}  # version -> when to look for it again (monotonic)
        self._loading: dict[str, list[_Item]] = {}  # version -> items waiting for its head (under _lock)
        self.max_batch, self.max_delay_s = max(1, max_batch), max_delay_ms / 1000
        self.dead_letter_dir, self.dead_letter_keep = dead_letter_dir, dead_letter_keep
        self.topics = Topics()
        self.counters: Counter[str] = Counter()
        self.batch_sizes: Counter[int] = Counter()
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._dead_seq = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="head-service", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=10)
            self._thread = None

    def submit(self, topic: str, data: bytes) -> None:
        self._queue.put(_Item(topic, data, time.monotonic()))

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {**self.counters, "batch_sizes": dict(sorted(self.batch_sizes.items()))}

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.counters[key] += n

    # -- worker ---------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch = [item]
            deadline = time.monotonic() + self.max_delay_s
            stop = False
            while len(batch) < self.max_batch:
                try:
                    nxt = self._queue.get(timeout=max(deadline - time.monotonic(), 0))
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            try:
                self.handle(batch)
            except Exception:  # a bug must not end the service; each message is answered or counted
                log.exception("head batch of %d failed", len(batch))
                self._count("errors", len(batch))
            if stop:
                return

    def handle(self, batch: list[_Item]) -> None:
        """Decode, group by version, run the heads, publish one result per accepted frame."""
        groups: dict[str, list[tuple[_Item, FeatureHeader, np.ndarray, StationId]]] = {}
        now = time.monotonic()
        for item in batch:
            if not item.requeued:
                self._count("received")
            try:
                station, kind = self.topics.parse(item.topic)
                if kind != "features":
                    raise ContractError("features", "", f"topic kind {kind!r}")
                header, payload = decode_features(item.data)
            except (ContractError, ValueError) as e:
                self._dead_letter(item, f"malformed feature message: {e}")
                continue
            head = self.heads.get(header.bundle_version)
            if head is None and self._waits_for_load(header.bundle_version, item):
                continue
            head = head or self.heads.get(header.bundle_version)  # loaded meanwhile
            spec = FeatureSpec(header.cut, header.channels, header.height, header.width, header.bits, header.codec)
            if head is None:
                self._refuse(station, header, f"no head for bundle version {header.bundle_version!r} here "
                                              f"(deployed: {sorted(self.heads)})", "refused_version")
                continue
            if spec != head.spec:
                self._refuse(station, header, f"feature spec {spec.shape}@{spec.bits} bits cut {spec.cut} differs from "
                                              f"bundle {head.version}'s", "refused_spec")
                continue
            if (now - item.received) * 1000 > header.deadline_ms:
                self._count("expired")
                continue
            try:
                codes = decode_codes(payload, head.spec)
            except FeatureDecodeError as e:
                self._dead_letter(item, f"undecodable codes: {e}")
                continue
            groups.setdefault(head.version, []).append((item, header, codes, station))
        for version, rows in groups.items():
            head = self.heads[version]
            for start in range(0, len(rows), self.max_batch):
                self._run_head(head, rows[start:start + self.max_batch])

    def _waits_for_load(self, version: str, item: _Item) -> bool:
        """True when ``item`` is to wait for ``version``'s head, loading in its own thread (started
        here when none is): it comes back through the queue once the load ends. False when there is
        no loader, the head has been loaded, or the version was not found lately."""
        if self.loader is None:
            return False
        with self._lock:
            if version in self.heads or self._missing.get(version, 0.0) > time.monotonic():
                return False
            waiting = self._loading.get(version)
            if waiting is None:
                self._loading[version] = waiting = []
                threading.Thread(target=self._load, args=(version,), name=f"head-load-{version}"[:60],
                                 daemon=True).start()
            waiting.append(item)
        return True

    def _load(self, version: str) -> None:
        """Load ``version``'s head (its own thread), then send back the items that waited for it."""
        assert self.loader is not None
        try:
            head = self.loader(version)
        except Exception as e:  # a bundle that does not load (bad hash, no split parts): refused
            log.error("head for bundle %s did not load: %s", version, e)
            head = None
        with self._lock:
            if head is None:
                if len(self._missing) >= _MISSING_KEEP:  # versions agents keep naming that are not here: bounded
                    self._missing.clear()
                self._missing[version] = time.monotonic() + RETRY_MISSING_S
                self.counters["heads_not_found"] += 1
            else:
                self._missing.pop(version, None)
                self.heads[version] = head
                self.counters["heads_loaded"] += 1
            waiting = self._loading.pop(version, [])
        if head is not None:
            log.info("head for bundle %s loaded on request (%d frames waited for it)", version, len(waiting))
        for item in waiting:
            self._queue.put(_Item(item.topic, item.data, item.received, requeued=True))

    def _run_head(self, head: Head, rows: list[tuple[_Item, FeatureHeader, np.ndarray, StationId]]) -> None:
        dets = head.detect(np.stack([r[2] for r in rows]))
        with self._lock:
            self.batch_sizes[len(rows)] += 1
        done = time.monotonic()
        for (item, header, _, station), d in zip(rows, dets, strict=True):
            result = SplitResultPayload(
                request_id=header.request_id, camera=header.camera, bundle_version=head.version, status="ok",
                detections=[HeadDetection(box=[float(v) for v in b], score=float(s), class_id=int(c))
                            for b, s, c in zip(d.boxes, d.scores, d.class_ids, strict=True)],
                hub_ms=round(1000 * (done - item.received), 2))
            self.publish(self.topics.station(station, "split_results"), encode_split_result(result))
        self._count("answered", len(rows))

    def _refuse(self, station: StationId, header: FeatureHeader, reason: str, counter: str) -> None:
        self._count(counter)
        log.warning("refused features from %s/%s/%s: %s", station.site, station.line, station.station, reason)
        result = SplitResultPayload(request_id=header.request_id, camera=header.camera,
                                    bundle_version=header.bundle_version, status="refused", reason=reason[:300])
        self.publish(self.topics.station(station, "split_results"), encode_split_result(result))

    def _dead_letter(self, item: _Item, reason: str) -> None:
        self._count("dead_letters")
        log.warning("dead letter from %s: %s", item.topic, reason)
        if self.dead_letter_dir is None:
            return
        d = self.dead_letter_dir
        d.mkdir(parents=True, exist_ok=True)
        with self._lock:
            self._dead_seq += 1
            name = f"{time.time_ns()}-{self._dead_seq:06d}"
        tmp = d / f".{name}.tmp"
        tmp.write_bytes(item.data)
        os.replace(tmp, d / f"{name}.bin")
        meta = d / f".{name}.json.tmp"
        meta.write_text(json.dumps({"topic": item.topic, "reason": reason, "bytes": len(item.data)}))
        os.replace(meta, d / f"{name}.json")
        old = sorted(d.glob("*.bin"))[: -self.dead_letter_keep or None]
        for p in old:
            p.unlink(missing_ok=True)
            p.with_suffix(".json").unlink(missing_ok=True)
