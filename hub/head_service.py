"""The head service: runs the hub side of split bundles for every agent in split mode.

Transport-agnostic core (the MQTT plumbing is :class:`hub.mqtt.HeadMqttWorker`; the heads and
their loading are :mod:`hub.heads`):
:meth:`HeadService.submit` takes one raw feature message (with its topic); a worker thread admits
what has arrived (waiting at most ``max_delay_ms`` for more once it has one: Triton's queue-delay
bound), then runs one batch at a time, **most urgent first**: the frames of the version whose frame
is nearest its deadline, nearest first, as many as fit (below); every frame gets one
:class:`SplitResultPayload` through ``publish(topic, bytes)``.

- **Urgency**: a frame is due ``deadline_ms`` after it arrived. A batch holds at most
  ``max_batch`` frames and no more than its head runs in half the shortest deadline lately seen
  (each head's time per frame is measured: a warm-up run at load, then every batch), so a frame
  that arrives when a batch starts can still be answered in time. An agent's warm-up frame (a long
  deadline, sent before it swaps versions) waits behind live frames and never holds them up for a
  whole batch of warm-ups. Under overload (more frames than the head runs) frames expire whatever
  the order: the head tier is sized to the fleet (docs/benchmarks.md has answers per second).
- **Versions**: one :class:`Head` per deployed bundle (``heads.bundles``), and with a ``loader``
  (``heads.bundles_dir``: where the retraining job writes its bundles) the head of a version an
  agent asks for is loaded the first time it is asked for, or when :meth:`HeadService.preload` is
  told of it (a rollout's announcement, before any agent swaps): a split agent that took an update
  is answered without a restart here (counted ``heads_loaded``; a version not found is looked for
  again after :data:`RETRY_MISSING_S`). The load (and its warm-up run) runs in its own thread:
  frames of that version wait for it (their deadlines still hold), frames of every other version go
  on being answered. A head loaded so that has run no frame for ``keep_idle_s`` (a day) is
  unloaded (``heads_unloaded``; looked for when frames come, at most once a minute; the configured
  ones stay). A message whose ``bundle_version`` has no head, or whose spec differs from that
  head's, is answered ``refused`` and counted (``refused_version``, ``refused_spec``), never
  decoded.
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
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hub.heads import Head, HeadLoader, release_unloaded
from lineguard_contract import ContractError, StationId, Topics
from lineguard_contract.features import (
    FeatureHeader,
    HeadDetection,
    SplitResultPayload,
    decode_features,
    encode_split_result,
)
from models.feature_codec import FeatureDecodeError, FeatureSpec, decode_codes

__all__ = ["RETRY_MISSING_S", "HeadService"]

log = logging.getLogger(__name__)
Publish = Callable[[str, bytes], None]
RETRY_MISSING_S = 30.0  #: a version the loader did not find is looked for again after this long
_MISSING_KEEP = 1000  # versions remembered as not found, at most


@dataclass
class _Item:
    topic: str
    data: bytes
    received: float  # monotonic
    requeued: bool = False  # back from waiting for its version's head to load


@dataclass
class _Frame:
    """An admitted feature message waiting for its head to run."""

    item: _Item
    header: FeatureHeader
    payload: bytes
    station: StationId
    due: float  # monotonic: when the agent stops waiting
    admitted: float  # monotonic: when the worker took it off the queue


_SWEEP_S = 60.0  # how often idle heads are looked for
_SLOW_LOG_S = 10.0  # slow answers are logged at most this often
_TIGHT_WINDOW_S = 10.0  # the shortest deadline lately seen is forgotten after this long without one as short


class HeadService:
    """``start()``/``stop()`` the worker thread; ``submit(topic, data)`` from any thread."""

    def __init__(self, heads: dict[str, Head], publish: Publish, *, max_batch: int = 32, max_delay_ms: float = 5.0,
                 dead_letter_dir: Path | None = None, dead_letter_keep: int = 1000,
                 loader: HeadLoader | None = None, keep_idle_s: float = 86400.0) -> None:
        if not heads:
            raise ValueError("no heads: configure at least one split bundle")
        self.heads, self.publish, self.loader = heads, publish, loader
        self.keep_idle_s = keep_idle_s
        self._used: dict[str, float] = {}  # loaded version -> when it last ran or loaded (monotonic)
        self._next_sweep = time.monotonic() + min(_SWEEP_S, keep_idle_s)
        self._missing: dict[str, float] = {}  # version -> when to look for it again (monotonic)
        self._loading: dict[str, list[_Item]] = {}  # version -> items waiting for its head (under _lock)
        self.max_batch, self.max_delay_s = max(1, max_batch), max_delay_ms / 1000
        self.dead_letter_dir, self.dead_letter_keep = dead_letter_dir, dead_letter_keep
        self.topics = Topics()
        self.counters: Counter[str] = Counter()
        self.batch_sizes: Counter[int] = Counter()
        self.batch_ms_max = 0.0
        self._tight: tuple[float, float] = (float("inf"), 0.0)  # shortest deadline_ms lately seen, when
        self._slow_logged = float("-inf")
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

    def preload(self, version: str) -> None:
        """Start loading ``version``'s head (a rollout announced it) unless it is here, loading, or
        was not found lately; no frame waits for it."""
        self._waits_for_load(version, None)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {**self.counters, "batch_sizes": dict(sorted(self.batch_sizes.items())),
                    "batch_ms_max": round(self.batch_ms_max, 1)}

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.counters[key] += n

    # -- worker ---------------------------------------------------------------------------------
    def _run(self) -> None:
        waiting: list[_Frame] = []
        while True:
            items, stop = self._take(block=not waiting)
            for item in items:
                try:
                    frame = self._admit(item)
                except Exception:  # a bug must not end the service; each message is answered or counted
                    log.exception("feature message from %s failed", item.topic)
                    self._count("errors")
                    continue
                if frame is not None:
                    waiting.append(frame)
            if waiting and not stop:
                self._serve(waiting)
            if stop:
                return
            self._unload_idle(waiting)

    def _unload_idle(self, waiting: list[_Frame]) -> None:
        """Drop the heads loaded on demand that ran no frame for ``keep_idle_s`` (weekly versions
        would otherwise pile up in memory; one asked for again is loaded again)."""
        now = time.monotonic()
        if now < self._next_sweep:
            return
        self._next_sweep = now + min(_SWEEP_S, self.keep_idle_s)
        busy = {f.header.bundle_version for f in waiting}
        with self._lock:
            idle = [v for v, t in self._used.items() if now - t > self.keep_idle_s and v not in busy]
            for version in idle:
                self.heads.pop(version, None)
                self._used.pop(version)
                self.counters["heads_unloaded"] += 1
        if idle:
            ms = release_unloaded()
            log.info("heads for bundles %s unloaded: no frame for %.0f s (collector %.0f ms)", ", ".join(idle),
                     self.keep_idle_s, ms)

    def _take(self, *, block: bool) -> tuple[list[_Item], bool]:
        """What has arrived: with nothing waiting, block for one and then up to ``max_delay_ms`` for
        a fuller batch; else only what is queued now. True when told to stop."""
        items: list[_Item] = []
        deadline = None
        while True:
            try:
                if block and not items:
                    nxt = self._queue.get()
                    deadline = time.monotonic() + self.max_delay_s
                elif deadline is not None and len(items) < self.max_batch:
                    nxt = self._queue.get(timeout=max(deadline - time.monotonic(), 0))
                else:
                    nxt = self._queue.get_nowait()
            except queue.Empty:
                return items, False
            if nxt is None:
                return items, True
            items.append(nxt)

    def _admit(self, item: _Item) -> _Frame | None:
        """Parse one message: answered ``refused``, dead-lettered, parked for its head's load, or
        admitted (returned) to wait for its turn."""
        if not item.requeued:
            self._count("received")
        try:
            station, kind = self.topics.parse(item.topic)
            if kind != "features":
                raise ContractError("features", "", f"topic kind {kind!r}")
            header, payload = decode_features(item.data)
        except (ContractError, ValueError) as e:
            self._dead_letter(item, f"malformed feature message: {e}")
            return None
        head = self.heads.get(header.bundle_version)
        if head is None and self._waits_for_load(header.bundle_version, item):
            return None
        head = head or self.heads.get(header.bundle_version)  # loaded meanwhile
        spec = FeatureSpec(header.cut, header.channels, header.height, header.width, header.bits, header.codec)
        if head is None:
            self._refuse(station, header, f"no head for bundle version {header.bundle_version!r} here "
                                          f"(deployed: {sorted(self.heads)})", "refused_version")
            return None
        if spec != head.spec:
            self._refuse(station, header, f"feature spec {spec.shape}@{spec.bits} bits cut {spec.cut} differs from "
                                          f"bundle {head.version}'s", "refused_spec")
            return None
        tight, seen = self._tight
        if header.deadline_ms <= tight or item.received - seen > _TIGHT_WINDOW_S:
            self._tight = (header.deadline_ms, item.received)
        return _Frame(item, header, payload, station, item.received + header.deadline_ms / 1000, time.monotonic())

    def _serve(self, waiting: list[_Frame]) -> None:
        """Run one batch: the frames of the most urgent frame's version, most urgent first, as many as
        fit (module docstring); the expired are dropped, the rest keep waiting in ``waiting``."""
        now = time.monotonic()
        live = [f for f in waiting if f.due >= now]
        if len(live) < len(waiting):
            self._count("expired", len(waiting) - len(live))
        live.sort(key=lambda f: f.due)
        if not live:
            waiting.clear()
            return
        head = self.heads[live[0].header.bundle_version]
        if head.version in self._used:
            self._used[head.version] = now
        fit = int(self._tight[0] / 2 // head.frame_ms) if head.frame_ms > 0 else self.max_batch
        chosen = [f for f in live if f.header.bundle_version == head.version][:max(1, min(fit, self.max_batch))]
        taken = {id(f) for f in chosen}
        waiting[:] = [f for f in live if id(f) not in taken]
        rows = []
        for f in chosen:
            try:
                rows.append((f, decode_codes(f.payload, head.spec)))
            except FeatureDecodeError as e:
                self._dead_letter(f.item, f"undecodable codes: {e}")
        if not rows:
            return
        try:
            self._run_head(head, rows)
        except Exception:  # a bug must not end the service; each message is answered or counted
            log.exception("head %s batch of %d failed", head.version, len(rows))
            self._count("errors", len(rows))

    def _waits_for_load(self, version: str, item: _Item | None) -> bool:
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
            if item is not None:
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
                self._used[version] = time.monotonic()
                self.counters["heads_loaded"] += 1
            waiting = self._loading.pop(version, [])
        if head is not None:
            log.info("head for bundle %s loaded (%d frames waited for it)", version, len(waiting))
        for item in waiting:
            self._queue.put(_Item(item.topic, item.data, item.received, requeued=True))

    def _run_head(self, head: Head, rows: list[tuple[_Frame, np.ndarray]]) -> None:
        t0 = time.perf_counter()
        dets = head.detect(np.stack([codes for _, codes in rows]))
        ms = 1000 * (time.perf_counter() - t0)
        head.frame_ms = 0.7 * head.frame_ms + 0.3 * ms / len(rows) if head.frame_ms > 0 else ms / len(rows)
        with self._lock:
            self.batch_sizes[len(rows)] += 1
            self.batch_ms_max = max(self.batch_ms_max, ms)
        done = time.monotonic()
        self._note_slow(rows, done, ms)
        for (f, _), d in zip(rows, dets, strict=True):
            result = SplitResultPayload(
                request_id=f.header.request_id, camera=f.header.camera, bundle_version=head.version, status="ok",
                detections=[HeadDetection(box=[float(v) for v in b], score=float(s), class_id=int(c))
                            for b, s, c in zip(d.boxes, d.scores, d.class_ids, strict=True)],
                hub_ms=round(1000 * (done - f.item.received), 2))
            self.publish(self.topics.station(f.station, "split_results"), encode_split_result(result))
        self._count("answered", len(rows))

    def _note_slow(self, rows: list[tuple[_Frame, np.ndarray]], done: float, run_ms: float) -> None:
        """Count answers that spent over half the shortest deadline here (``slow_answers``) and say
        where the slowest went, at most every :data:`_SLOW_LOG_S`: on the queue before the worker took
        it (the worker was busy), waiting for its batch (other batches first), the batch's run."""
        slow = [f for f, _ in rows if (done - f.item.received) * 2000 > self._tight[0]]
        if not slow:
            return
        self._count("slow_answers", len(slow))
        if done < self._slow_logged + _SLOW_LOG_S:
            return
        self._slow_logged = done
        f = min(slow, key=lambda f: f.item.received)
        log.warning("%d answers slower than %.0f ms (%d so far); the slowest %.0f ms: %.0f ms queued before the "
                    "worker took it, %.0f ms waiting for its batch, %.0f ms the run of a batch of %d",
                    len(slow), self._tight[0] / 2, self.counters["slow_answers"], 1000 * (done - f.item.received),
                    1000 * (f.admitted - f.item.received), 1000 * (done - f.admitted) - run_ms, run_ms, len(rows))

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
