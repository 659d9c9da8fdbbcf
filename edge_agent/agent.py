"""The running agent: cameras -> adaptive batcher -> detector -> sampler -> outbox -> MQTT.

Threads, and what each may block on:

- one capture thread per camera (``edge_agent.capture``): the device only;
- the batcher thread: the detector only; its ``on_results`` callback does cheap work (metrics,
  QoS 0 results, the sampling decision) and hands selected frames to ...
- the sample writer thread: JPEG encoding and the outbox's fsync, off the frame loop;
- the uplink's pump thread and paho's network thread;
- the heartbeat thread; the ``/metrics`` server thread.

Nothing a camera or the broker does can stop the others: a lost camera is retried by its own
thread, a lost broker only grows the outbox.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import cv2

from edge_agent.batcher import AdaptiveBatcher, BatchPolicy, Result
from edge_agent.config import AgentConfig
from edge_agent.detector import Detector
from edge_agent.metrics import AgentMetrics
from edge_agent.outbox import SampleOutbox
from edge_agent.runtime import create_detector
from edge_agent.sampler import Reason, SamplePolicy
from edge_agent.source_api import Source, SourceState
from edge_agent.sources import open_source
from edge_agent.transport import Transport
from edge_agent.uplink import Uplink
from lineguard_contract import (
    Detection,
    HeartbeatPayload,
    ResultPayload,
    SamplePayload,
    StationId,
    Topics,
    new_sample_id,
)

__all__ = ["Agent", "build_transport"]

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    result: Result
    reason: Reason


def build_transport(cfg: AgentConfig) -> Transport:
    """The MQTT transport the config describes (the only place that knows about paho's options)."""
    from edge_agent.mqtt import MqttConfig, MqttTransport, TlsOptions

    m = cfg.mqtt
    tls = TlsOptions(ca_file=m.ca_file, cert_file=m.cert_file, key_file=m.key_file) if m.tls else None
    password = m.password()
    return MqttTransport(MqttConfig(
        client_id=cfg.identity.client_id, host=m.host, port=m.port, protocol=m.protocol,
        keepalive_s=m.keepalive_s, username=m.username, password=password if m.username else None, tls=tls,
        max_inflight=max(64, 2 * m.max_inflight),
    ))


class Agent:
    def __init__(self, cfg: AgentConfig, *, transport: Transport | None = None,
                 detector: Detector | None = None, sources: list[Source] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.clock = clock
        ident = cfg.identity
        self.station = StationId(ident.site, ident.line, ident.station)
        self.transport = transport or build_transport(cfg)
        self.store: Any = None
        self.updater: Any = None
        self.detector = detector or self._make_detector(cfg)
        self.sources = sources if sources is not None else [
            open_source(c.source, c.id, loop=c.loop, realtime=c.realtime) for c in cfg.cameras]
        self.metrics = AgentMetrics()
        self.outbox = SampleOutbox(cfg.outbox.path, quota_bytes=int(cfg.outbox.quota_mb * 1024 * 1024))
        self.uplink: Uplink | None = None
        self.batcher: AdaptiveBatcher | None = None
        self.policy: SamplePolicy | None = None
        self._samples: queue.Queue[_Pending | None] = queue.Queue(maxsize=512)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._started = 0.0
        self.samples_queued = 0
        self.samples_stored = 0
        self.sample_errors = 0

    @staticmethod
    def bundle_roles(cfg: AgentConfig) -> tuple[str, ...]:
        """The bundle files this agent runs: the full model, the split edge part, or (split mode
        ``auto``) both; what it verifies, keeps in its store and downloads in an update."""
        return {"full": (cfg.model.role,), "split": ("split_edge_int8",),
                "auto": ("split_edge_int8", cfg.model.role)}[cfg.split.mode]

    def _make_detector(self, cfg: AgentConfig) -> Detector:
        use_store = cfg.model.store is not None
        if cfg.model.public_keys and not use_store:  # the store verifies what it runs itself
            from models.signing import load_public_keys, verify_bundle

            b = verify_bundle(cfg.model.bundle, load_public_keys(cfg.model.public_keys), roles=self.bundle_roles(cfg))
            log.info("bundle %s v%s: signature and file hashes verified", cfg.model.bundle, b.manifest.version)

        detector = self._detector_for(self._open_store(cfg) if use_store else str(cfg.model.bundle))
        if self.store is not None:
            from edge_agent.swap import SwappableDetector

            return SwappableDetector(detector)
        return detector

    def _detector_for(self, bundle_dir: str, previous: Detector | None = None) -> Detector:
        """The detector this agent's mode runs on ``bundle_dir``. In split mode ``previous`` (the
        split detector it replaces) keeps receiving the hub's answers to the frames it sent."""
        cfg, sp = self.cfg, self.cfg.split
        if sp.mode == "full":
            return self._local_detector(bundle_dir)
        from edge_agent.split_detector import SplitDetector
        from models.bundle import load_bundle

        bundle = load_bundle(bundle_dir, roles=("split_edge_int8",))
        return SplitDetector(bundle, self.transport, self.station, cfg.identity.client_id, mode=sp.mode,
                             fallback=self._local_detector(bundle_dir) if sp.mode == "auto" else None,
                             deadline_ms=sp.deadline_ms, fallback_after=sp.fallback_after,
                             probe_interval_s=sp.probe_interval_s, threads=cfg.model.threads, conf=cfg.model.conf,
                             previous=previous if isinstance(previous, SplitDetector) else None)

    def _local_detector(self, bundle_dir: str) -> Detector:
        cfg = self.cfg
        return create_detector(
                bundle_dir, runtime=cfg.model.runtime, role=cfg.model.role,
                providers=cfg.model.providers, conf=cfg.model.conf, threads=cfg.model.threads,
                # Live frames want latency: one session with every core finishes a frame soonest
                # (57 ms here against 92 ms for a 1-thread session); more sessions only pay once the
                # batcher runs batches of several cameras (model.workers).
                workers=cfg.model.workers or 1)

    def _open_store(self, cfg: AgentConfig) -> str:
        """The bundle store (seeded from ``model.bundle`` when empty); returns the current bundle's dir."""
        from edge_agent.bundle_store import BundleStore
        from models.signing import load_public_keys

        assert cfg.model.store is not None
        keys = load_public_keys(cfg.model.public_keys) if cfg.model.public_keys else None
        self.store = BundleStore(cfg.model.store, public_keys=keys, roles=self.bundle_roles(cfg))
        if self.store.current_version() is None:
            self.store.install(cfg.model.bundle)
            log.info("bundle store %s seeded from %s", cfg.model.store, cfg.model.bundle)
        return str(self.store.current().dir)

    def _activate(self, bundle: Any) -> None:
        """A bundle the store installed: load it beside the running one, swap between batches."""
        new = self._detector_for(str(bundle.dir), previous=self.detector.active)  # type: ignore[attr-defined]
        self.detector.swap(new)  # type: ignore[attr-defined]  # a SwappableDetector whenever a store is open
        if self.uplink is not None:
            self.uplink.set_model_version(new.version)

    # ---- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        self.detector.load()
        version = self.detector.version
        conf = getattr(self.detector, "conf", 0.25)
        s = self.cfg.sampling
        self.policy = SamplePolicy(defect_conf=s.defect_conf if s.defect_conf is not None else conf,
                                   uncertain_band=s.uncertain_band, negative_rate=s.negative_rate,
                                   max_per_minute=s.max_per_minute)
        self.uplink = Uplink(self.transport, self.outbox, self.station, self.cfg.identity.client_id, version,
                             max_inflight=self.cfg.mqtt.max_inflight)
        b = self.cfg.batching
        policy = BatchPolicy(slo_ms=b.latency_slo_ms, max_batch=b.max_batch, max_queue_delay_ms=b.max_queue_delay_ms)
        self.batcher = AdaptiveBatcher(self.detector, policy=policy, on_results=self._on_results)
        self._bind_metrics()
        if self.store is not None:
            self._start_updates()
        self.uplink.start()
        for src in self.sources:
            if hasattr(src, "transform"):
                src.transform = self.detector.prepare  # letterbox in each camera's thread
            src.start()
            self.batcher.add_source(src)
        self._started = time.monotonic()
        self._spawn(self._sample_writer, "samples")
        self._spawn(self._heartbeat_loop, "heartbeat")
        self.batcher.start()
        if self.cfg.metrics.port:
            port = self.metrics.serve(self.cfg.metrics.host, self.cfg.metrics.port)
            log.info("metrics on http://%s:%d/metrics", self.cfg.metrics.host, port)
        log.info("agent %s up: %d camera(s), model v%s on %s", self.cfg.identity.client_id, len(self.sources),
                 version, getattr(self.detector, "provider", "?"))

    def _start_updates(self) -> None:
        from edge_agent.ota import BundleFetcher, ModelUpdater

        m = self.cfg.model
        fetcher = BundleFetcher(token=os.environ.get(m.update_token_env), ca_file=m.update_ca_file)
        self.updater = ModelUpdater(self.store, fetcher, self._activate, roles=self.bundle_roles(self.cfg),
                                    pinned=m.pinned_version)
        counters = self.updater.counters

        def reader(key: str) -> Callable[[], float]:
            return lambda: float(counters[key])

        for key in ("updated", "already_current", "retries", "downgrade", "download", "verify", "activate",
                    "malformed"):
            self.metrics.model_updates.labels(key).set_function(reader(key))
        self.updater.start()
        self.transport.subscribe(Topics().station(self.station, "model"),
                                 lambda topic, payload: self.updater.handle(payload))

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def finished(self) -> bool:
        """True when every source is finite and has ended (a replayed file without loop)."""
        return all(s.state in (SourceState.ENDED, SourceState.CLOSED) and s.peek() is None for s in self.sources)

    def stop(self, drain_s: float = 5.0) -> None:
        """Stop cameras and inference, store every selected sample, try to deliver for ``drain_s``."""
        self._stop.set()
        for src in self.sources:
            src.close()
        if self.batcher is not None:
            self.batcher.stop()
        if self.updater is not None:
            self.updater.stop()
        self._samples.put(None)
        for t in self._threads:
            t.join(timeout=10)
        if self.uplink is not None:
            if drain_s > 0:
                self.uplink.wait_drained(drain_s)
            self.uplink.stop()
        self.metrics.close()
        left = self.outbox.depth
        self.outbox.close()
        log.info("agent stopped: %d samples stored, %d left in the outbox for the next start",
                 self.samples_stored, left)

    # ---- the frame path (batcher thread) ----------------------------------------------------
    def _on_results(self, results: list[Result]) -> None:
        assert self.uplink is not None and self.policy is not None
        m = self.metrics
        classes = self.detector.classes
        for r in results:
            cam = r.frame.camera_id
            m.frames_processed.labels(cam).inc()
            m.latency.observe(r.latency_s)
            if r.detections.undecided:  # split mode, no hub answer and no local model: nothing to say
                m.frames_undecided.labels(cam).inc()
                continue
            if self.cfg.mqtt.publish_results:
                dets = [Detection(**d) for d in r.detections.to_records(classes)]
                self.uplink.send_result(ResultPayload(camera=cam, frame=r.frame.index, pts=r.frame.pts,
                                                      ts=r.frame.capture_time or self.clock(),
                                                      model_version=self.detector.version, detections=dets))
            decision = self.policy.decide(cam, r.detections)
            if decision.reason is not None:
                m.samples.labels(cam, decision.reason).inc()
                try:
                    self._samples.put_nowait(_Pending(r, decision.reason))
                    self.samples_queued += 1
                except queue.Full:  # the writer is stuck on the disk: say so, loudly
                    self.sample_errors += 1
                    log.error("sample queue full (disk too slow or failing): sample of %s frame %d not stored",
                              cam, r.frame.index)
        if results:
            m.batch_infer.observe(max(0.0, results[0].latency_s - results[0].queued_s))

    # ---- samples (writer thread) ------------------------------------------------------------
    def _sample_writer(self) -> None:
        assert self.uplink is not None
        quality = self.cfg.sampling.jpeg_quality
        while True:
            item = self._samples.get()
            if item is None:
                return
            try:
                self.uplink.send_sample(self._sample_payload(item, quality))
                self.samples_stored += 1
            except Exception:
                self.sample_errors += 1
                log.exception("could not store a sample of %s frame %d", item.result.frame.camera_id,
                              item.result.frame.index)

    def _sample_payload(self, item: _Pending, quality: int) -> SamplePayload:
        fr = item.result.frame
        ok, jpeg = cv2.imencode(".jpg", fr.image, [cv2.IMWRITE_JPEG_QUALITY, quality])
        if not ok:
            raise RuntimeError("JPEG encoding failed")
        h, w = fr.image.shape[:2]
        dets = [Detection(**d) for d in item.result.detections.to_records(self.detector.classes)]
        return SamplePayload(
            sample_id=new_sample_id(), site=self.station.site, line=self.station.line,
            station=self.station.station, camera=fr.camera_id, capture_ts=fr.capture_time or self.clock(),
            model_version=self.detector.version, reason=item.reason, width=w, height=h,
            image=jpeg.tobytes(), detections=dets)

    # ---- health -----------------------------------------------------------------------------
    def _bind_metrics(self) -> None:
        m, up, bt = self.metrics, self.uplink, self.batcher
        assert up is not None and bt is not None
        m.bind(m.outbox_depth, lambda: float(up.counters().depth))
        m.bind(m.outbox_bytes, lambda: float(up.counters().outbox_bytes))
        m.bind(m.outbox_evicted, lambda: float(up.counters().evicted))
        m.bind(m.bytes_sent, lambda: float(up.counters().bytes_acked))
        m.bind(m.mqtt_connected, lambda: 1.0 if up.counters().connected else 0.0)
        if self.cfg.split.mode != "full" and callable(getattr(self.detector, "stats", None)):
            def stats() -> dict[str, Any]:  # the running detector's, after a model swap too
                return self.detector.stats()  # type: ignore[attr-defined]

            def reader(key: str) -> Callable[[], float]:
                return lambda: float(stats().get(key, 0))

            for key in ("split_frames", "fallback_frames", "undecided_frames", "local_frames", "refused",
                        "bytes_sent", "messages_sent", "late_results", "switches_to_local", "switches_to_split"):
                m.split.labels(key).set_function(reader(key))
            m.bind(m.split_local, lambda: 1.0 if stats().get("state") == "local" else 0.0)
        m.bind(m.batch_size, lambda: float(bt.batch_size))
        m.bind(m.fps, lambda: float(bt.stats().fps))
        m.bind(m.queue_depth, lambda: float(bt.stats().queue_depth))
        for src in self.sources:
            cam = src.camera_id
            m.camera_up.labels(cam).set_function(_camera_up(src))
        m.registry.register(_SourceCollector(self.sources))

    def health(self) -> HeartbeatPayload:
        assert self.uplink is not None and self.batcher is not None
        st, up = self.batcher.stats(), self.uplink.counters()
        return HeartbeatPayload(
            agent_id=self.cfg.identity.client_id, ts=self.clock(), model_version=self.detector.version,
            uptime_s=time.monotonic() - self._started, fps=st.fps,
            dropped_frames=sum(s.stats().dropped for s in self.sources), batch_size=st.batch_size,
            latency_p50_ms=_finite(st.latency_p50_ms), latency_p99_ms=_finite(st.latency_p99_ms),
            outbox_depth=up.depth, outbox_bytes=up.outbox_bytes, evicted=up.evicted, mode=self.cfg.split.mode)

    def _heartbeat_loop(self) -> None:
        assert self.uplink is not None
        while not self._stop.wait(self.cfg.mqtt.heartbeat_s):
            try:
                self.uplink.send_heartbeat(self.health())
            except Exception:
                log.exception("heartbeat failed")


def _camera_up(src: Source) -> Callable[[], float]:
    return lambda: 1.0 if src.state is SourceState.RUNNING else 0.0


def _finite(x: float) -> float:
    return x if math.isfinite(x) else 0.0  # no frame in the window yet


class _SourceCollector:
    """Per-camera capture counters, read from the sources at scrape time."""

    def __init__(self, sources: list[Source]) -> None:
        self.sources = sources

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily

        cap = CounterMetricFamily("lineguard_frames_in", "Frames read from the camera", labels=["camera"])
        drop = CounterMetricFamily("lineguard_frames_dropped", "Frames replaced before inference took them "
                                   "(newest frame wins)", labels=["camera"])
        fail = CounterMetricFamily("lineguard_camera_failures", "Failed opens/reads of the camera", labels=["camera"])
        for s in self.sources:
            st = s.stats()
            cap.add_metric([s.camera_id], st.captured)
            drop.add_metric([s.camera_id], st.dropped)
            fail.add_metric([s.camera_id], st.failures)
        yield from (cap, drop, fail)
