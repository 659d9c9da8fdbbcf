"""Prometheus metrics of one agent, served at ``/metrics``.

Each agent owns a private :class:`~prometheus_client.CollectorRegistry` (tests can run several
agents in one process). Gauges that mirror another component's counters (outbox depth, queue
depth) are sampled at scrape time through callbacks, so they are never stale.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from wsgiref.simple_server import WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer, _SilentHandler

__all__ = ["AgentMetrics"]

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0)


class AgentMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        # frames in / dropped per camera are read from the sources at scrape time (see edge_agent.agent)
        self.frames_processed = Counter("lineguard_frames_processed", "Frames through the model", ["camera"],
                                        registry=r)
        self.latency = Histogram("lineguard_frame_latency_seconds", "Capture to result, per frame",
                                 buckets=_LATENCY_BUCKETS, registry=r)
        self.batch_size = Gauge("lineguard_batch_size", "Current target batch size", registry=r)
        self.batch_infer = Histogram("lineguard_batch_infer_seconds", "Model time per batch",
                                     buckets=_LATENCY_BUCKETS, registry=r)
        self.fps = Gauge("lineguard_fps", "Frames processed per second (all cameras, 10 s window)", registry=r)
        self.queue_depth = Gauge("lineguard_queue_depth", "Frames waiting for the model", registry=r)
        self.outbox_depth = Gauge("lineguard_outbox_depth", "Samples waiting for broker acknowledgement",
                                  registry=r)
        self.outbox_bytes = Gauge("lineguard_outbox_bytes", "Bytes held in the outbox", registry=r)
        self.outbox_evicted = Gauge("lineguard_outbox_evicted", "Samples evicted past the disk quota (total)",
                                    registry=r)
        self.bytes_sent = Gauge("lineguard_mqtt_bytes_sent", "Payload bytes acknowledged by the broker (total)",
                                registry=r)
        self.samples = Counter("lineguard_samples", "Samples selected", ["camera", "reason"], registry=r)
        self.camera_up = Gauge("lineguard_camera_up", "1 when the camera delivers frames", ["camera"], registry=r)
        self.mqtt_connected = Gauge("lineguard_mqtt_connected", "1 while connected to the broker", registry=r)
        self.frames_undecided = Counter("lineguard_frames_undecided", "Split mode: frames with no result at all",
                                        ["camera"], registry=r)
        self.split = Gauge("lineguard_split", "Split mode counters since start (frames answered by the hub, "
                           "fallback/undecided frames, refusals, bytes sent, mode switches)", ["counter"], registry=r)
        self.split_local = Gauge("lineguard_split_local", "Split mode auto: 1 while running the local model",
                                 registry=r)
        self.model_updates = Gauge("lineguard_model_updates", "Over-the-air updates since start: updated, retries, "
                                   "and refusals by reason (downgrade, download, verify, activate, malformed)",
                                   ["counter"], registry=r)
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def bind(self, gauge: Gauge, fn: Callable[[], float]) -> None:
        """Let ``gauge`` read ``fn()`` at scrape time."""
        gauge.set_function(fn)

    def serve(self, host: str, port: int) -> int:
        """Start ``/metrics`` in a daemon thread; returns the bound port (``port=0`` picks one)."""
        app = make_wsgi_app(self.registry)
        self._server = make_server(host, port, app, ThreadingWSGIServer, handler_class=_SilentHandler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics", daemon=True)
        self._thread.start()
        return int(self._server.server_port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
