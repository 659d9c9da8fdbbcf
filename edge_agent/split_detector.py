"""Split mode on the agent: the bundle's edge part here, the detection head at the hub.

:class:`SplitDetector` is a :class:`~edge_agent.detector.Detector` like the others, so the batcher,
sampler and uplink do not change. For a batch it runs the edge part (INT8), publishes each frame's
codes (:mod:`lineguard_contract.features`, QoS 0), and waits up to ``deadline_ms`` for the head
service's answers on its ``split_results`` topic; boxes come back in model-input pixels and are
mapped to the frame here with the frame's own letterbox.

Fallback (``mode``):

- ``split``: a frame whose answer misses the deadline (or is refused) is **undecided**: an empty
  :class:`Detections` with ``undecided=True``, counted, never sampled as a negative;
- ``auto``: such a frame runs on the local full model instead (counted as ``fallback``); after
  ``fallback_after`` batches in a row with a miss, the agent runs locally and only probes the hub
  (one frame's codes every ``probe_interval_s``); the first answer to a probe switches it back.

Every counter is in :meth:`stats` (and the agent's /metrics).

A model update (:mod:`edge_agent.swap`) replaces one split detector with another on the same
``split_results`` topic: the new one is built with ``previous=`` the old, takes over the topic when
it loads, and hands the old one the answers to the frames the old one sent (each request id starts
with its detector's run id), so a frame in flight across the swap keeps its answer. The counters
carry over, so they stay "since the agent started".
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from edge_agent.detector import Detector, DetectorError, Prepared
from edge_agent.transport import Message, Transport, TransportError
from lineguard_contract import ContractError, StationId, Topics
from lineguard_contract.features import FeatureHeader, SplitResultPayload, decode_split_result, encode_features
from models.bundle import Bundle
from models.detections import Detections
from models.feature_codec import FeatureSpec, encode_codes
from models.processing import preprocess_batch, scale_boxes_to_original
from models.split_runtime import SplitEdgeRunner

__all__ = ["SplitDetector"]

log = logging.getLogger(__name__)


class SplitDetector(Detector):
    def __init__(self, bundle: Bundle, transport: Transport, station: StationId, agent_id: str, *,
                 mode: Literal["split", "auto"] = "auto", fallback: Detector | None = None,
                 deadline_ms: float = 250.0, fallback_after: int = 3, probe_interval_s: float = 2.0,
                 threads: int | None = None, conf: float | None = None,
                 previous: SplitDetector | None = None, hub_warmup_s: float = 15.0) -> None:
        if bundle.manifest.split is None:
            raise DetectorError(f"bundle {bundle.dir} v{bundle.manifest.version} has no split parts")
        if mode == "auto" and fallback is None:
            raise DetectorError("split mode auto needs a local model to fall back on")
        self._configure(bundle, conf, None)
        self.spec = FeatureSpec.from_dict(bundle.manifest.split["spec"])
        self.transport, self.station, self.agent_id = transport, station, agent_id
        self.mode, self.fallback = mode, fallback
        self.deadline_s = deadline_ms / 1000
        self.fallback_after, self.probe_interval_s = fallback_after, probe_interval_s
        self.threads = threads
        topics = Topics()
        self.features_topic = topics.station(station, "features")
        self.results_topic = topics.station(station, "split_results")
        self.counters: Counter[str] = Counter()
        self.state: Literal["split", "local"] = "split"
        self.provider = ""
        self._edge: SplitEdgeRunner | None = None
        self._run_id = uuid.uuid4().hex[:12]  # a restarted agent never takes an old answer for a new frame
        self._seq = 0
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._answers: dict[str, SplitResultPayload] = {}
        self._waiting: set[str] = set()
        self._probes: set[str] = set()
        self._misses = 0
        self._next_probe = 0.0
        self.previous = previous  # the split detector this one replaces (its answers still arrive here)
        self.late_hub_ms: deque[float] = deque(maxlen=256)  # hub_ms of the latest answers that came too late
        self.hub_warmup_s = hub_warmup_s

    # -- Detector ---------------------------------------------------------------------------------
    def load(self) -> None:
        try:
            self._edge = SplitEdgeRunner(self.bundle.path("split_edge_int8"), self.spec, version=self.version,
                                         threads=self.threads or os.cpu_count())
        except Exception as exc:
            raise DetectorError(f"split edge part of bundle {self.version}: {exc}") from exc
        self.provider = f"split:{self._edge.provider}"
        if self.fallback is not None:
            self.fallback.load()
        codes = self._edge.run(np.zeros((1, 3, *self.input_size), np.float32))  # warm-up, before taking the topic
        prev = self.previous
        if prev is not None:
            prev.previous = None  # one step back only: the swap keeps one old detector
            with prev._lock:
                self.counters.update(prev.counters)
        self.transport.subscribe(self.results_topic, self._on_result)
        if prev is not None:
            self._warm_hub(codes[0])
        log.info("split mode %s: edge part of bundle %s (cut %d, codes %s at %d bits), deadline %.0f ms, "
                 "local fallback: %s", self.mode, self.version, self.spec.cut, self.spec.shape, self.spec.bits,
                 1000 * self.deadline_s, "yes" if self.fallback else "no (undecided frames)")

    def _warm_hub(self, codes: np.ndarray) -> None:
        """An update: one frame to the hub for this version before the swap, so that the hub loads
        its head while the replaced detector still answers the line's frames (frames sent before
        the head is loaded would pass their deadline). A hub that refuses the version: split mode
        cannot run it (raises: the update is refused, the old version keeps running); auto mode
        would run every frame locally (a warning). No answer: the hub is away for every version,
        the swap goes on."""
        rid = self._send(codes, deadline_s=self.hub_warmup_s)
        ans = self._wait([rid], time.monotonic() + self.hub_warmup_s).get(rid) if rid else None
        if ans is None:
            self.counters["hub_warmup_unanswered"] += 1
            log.warning("split: the hub did not answer bundle %s's first frame in %.0f s; swapping all the same",
                        self.version, self.hub_warmup_s)
        elif ans.status != "ok":
            if self.mode == "split":
                raise DetectorError(f"the hub cannot run bundle {self.version}'s head: {ans.reason}")
            log.warning("split: the hub cannot run bundle %s's head (%s): frames run locally", self.version,
                        ans.reason)

    def prepare(self, image: np.ndarray) -> Prepared:
        batch, infos = preprocess_batch([image], self.input_size)
        return Prepared(batch[0], infos[0])

    def detect(self, frames: Sequence[np.ndarray]) -> list[Detections]:
        return self.detect_prepared([self.prepare(f) for f in frames])

    def detect_prepared(self, items: Sequence[Prepared]) -> list[Detections]:
        if self._edge is None:
            raise DetectorError("detect() called before load()")
        if not items:
            return []
        if self.state == "local":
            assert self.fallback is not None
            now = time.monotonic()
            if now >= self._next_probe:  # ask the hub with one frame; its answer brings split mode back
                self._next_probe = now + self.probe_interval_s
                codes = self._edge.run(items[0].data[None])
                rid = self._send(codes[0], probe=True)
                if rid:
                    self.counters["probes"] += 1
            self.counters["local_frames"] += len(items)
            return self.fallback.detect_prepared(items)
        codes = self._edge.run(np.stack([p.data for p in items]))
        ids = [self._send(c) for c in codes]
        answers = self._wait([i for i in ids if i], time.monotonic() + self.deadline_s)
        out: list[Detections | None] = []
        missed: list[int] = []
        for k, (item, rid) in enumerate(zip(items, ids, strict=True)):
            ans = answers.get(rid) if rid else None
            if ans is None or ans.status != "ok":
                missed.append(k)
                out.append(None)
                continue
            out.append(self._to_detections(ans, item))
        self.counters["split_frames"] += len(items) - len(missed)
        if missed:
            self._misses += 1
            if self.fallback is not None:
                local = self.fallback.detect_prepared([items[k] for k in missed])
                for k, d in zip(missed, local, strict=True):
                    out[k] = d
                self.counters["fallback_frames"] += len(missed)
            else:
                for k in missed:
                    out[k] = Detections.empty(undecided=True)
                self.counters["undecided_frames"] += len(missed)
            if self.fallback is not None and self._misses >= self.fallback_after:
                self.state = "local"
                self._next_probe = time.monotonic() + self.probe_interval_s
                self.counters["switches_to_local"] += 1
                log.warning("split mode: the hub missed %d batches in a row; running the local model, probing "
                            "the hub every %.1f s", self._misses, self.probe_interval_s)
        else:
            self._misses = 0
        return [d for d in out if d is not None]

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {**self.counters, "state": self.state}

    # -- wire -------------------------------------------------------------------------------------
    def _send(self, codes: np.ndarray, probe: bool = False, deadline_s: float | None = None) -> str | None:
        with self._lock:
            self._seq += 1
            rid = f"{self._run_id}-{self._seq}"
            self._waiting.add(rid)
            if probe:
                if len(self._probes) >= 64:  # unanswered probes of a hub that stays away: forget them
                    self._waiting.difference_update(self._probes)
                    self._probes.clear()
                self._probes.add(rid)
        header = FeatureHeader.model_validate(
            {"request_id": rid, "agent_id": self.agent_id, "camera": "agent", "ts": time.time(),
             "bundle_version": self.version, **self.spec.to_dict(),
             "deadline_ms": 1000 * (deadline_s or self.deadline_s)})
        data = encode_features(header, encode_codes(codes, self.spec))
        try:
            self.transport.publish(Message(self.features_topic, data, qos=0))
        except TransportError as exc:  # not connected: the frame's answer cannot come
            with self._lock:
                self._waiting.discard(rid)
                self._probes.discard(rid)
            self.counters["send_failures"] += 1
            log.debug("split: %s", exc)
            return None
        self.counters["bytes_sent"] += len(data)
        self.counters["messages_sent"] += 1
        return rid

    def _wait(self, ids: list[str], deadline: float) -> dict[str, SplitResultPayload]:
        with self._cond:
            while not all(i in self._answers for i in ids):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            got = {i: self._answers.pop(i) for i in ids if i in self._answers}
            self._waiting.difference_update(ids)  # a late answer is dropped on arrival
            return got

    def _on_result(self, topic: str, payload: bytes) -> None:
        try:
            ans = decode_split_result(payload)
        except ContractError as exc:
            self.counters["bad_results"] += 1
            log.warning("split: malformed result on %s: %s", topic, exc)
            return
        prev = self.previous
        if prev is not None and not ans.request_id.startswith(f"{self._run_id}-"):
            prev._on_result(topic, payload)  # a frame the replaced detector sent before the swap
            return
        with self._cond:
            rid = ans.request_id
            if rid in self._probes:
                self._probes.discard(rid)
                self._waiting.discard(rid)
                if ans.status == "ok" and self.state == "local":
                    self.state, self._misses = "split", 0
                    self.counters["switches_to_split"] += 1
                    log.warning("split mode: the hub answers again; back to split inference")
                return
            if rid not in self._waiting:
                self.counters["late_results"] += 1
                self.late_hub_ms.append(ans.hub_ms)  # the hub's share of the lateness
                return
            if ans.status == "refused":
                self.counters["refused"] += 1
                log.warning("split: the hub refused frame %s: %s", rid, ans.reason)
            self._answers[rid] = ans
            self._cond.notify_all()

    def _to_detections(self, ans: SplitResultPayload, item: Prepared) -> Detections:
        if not ans.detections:
            return Detections.empty()
        boxes = np.array([d.box for d in ans.detections], np.float32)
        if item.info is not None:
            boxes = scale_boxes_to_original(boxes, item.info)
        det = Detections(boxes, np.array([d.score for d in ans.detections], np.float32),
                         np.array([d.class_id for d in ans.detections], np.int32))
        return det.filter(self.conf)
