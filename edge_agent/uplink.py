"""The uplink: drains the sample outbox to the broker and publishes live results and health.

Samples go through the durable :class:`~edge_agent.outbox.SampleOutbox`: :meth:`Uplink.send_sample`
stores the encoded payload and returns; a pump thread publishes the oldest samples at QoS 1,
at most ``max_inflight`` unacknowledged at a time, and deletes each one from the outbox only
when the broker has acknowledged it. Results and heartbeats are QoS 0 and skip the outbox:
when the link is down they are dropped and counted.

Delivery is *at least once*: a sample is re-sent after a reconnect (the transport's persistent
session retransmits every unacknowledged message, see :class:`~edge_agent.transport.Transport`)
and, after an agent restart, every sample still in the outbox is sent again. The broker and the hub may therefore
see a sample twice; the hub deduplicates by ``sample_id``, so a sample is *stored* exactly once
by id. That is what "exactly once" means in LineGuard.

A broker that refuses a sample (MQTT 5 reason code >= 0x80, e.g. not authorized) does not
acknowledge it: the sample stays in the outbox, is logged and counted as ``rejected``, and is
tried again when the agent restarts.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Literal

from edge_agent.outbox import OutboxError, SampleOutbox
from edge_agent.transport import Message, Transport, TransportError
from lineguard_contract.payloads import (
    HeartbeatPayload,
    ResultPayload,
    SamplePayload,
    StatusPayload,
    encode,
)
from lineguard_contract.topics import StationId, Topics

__all__ = ["Uplink", "UplinkCounters"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UplinkCounters:
    """Figures for metrics. Counts are since this Uplink started; ``evicted`` is the outbox's lifetime total."""

    connected: bool
    sent: int  # samples handed to the transport (the transport's own retransmissions are not counted)
    acked: int  # samples acknowledged by the broker and deleted from the outbox
    rejected: int  # negative acknowledgements (MQTT 5)
    bytes_sent: int  # sample payload bytes handed to the transport
    bytes_acked: int  # sample payload bytes acknowledged by the broker
    inflight: int
    depth: int  # samples in the outbox (in flight included)
    outbox_bytes: int
    evicted: int
    results_sent: int
    results_dropped: int  # QoS 0 results and heartbeats dropped while the link was down


class Uplink:
    """Publishes one station's samples (durably), results, heartbeats and presence."""

    def __init__(
        self,
        transport: Transport,
        outbox: SampleOutbox,
        station: StationId,
        agent_id: str,
        model_version: str,
        *,
        topics: Topics | None = None,
        max_inflight: int = 16,
        poll_s: float = 0.5,
    ) -> None:
        if max_inflight < 1:
            raise ValueError(f"max_inflight must be >= 1, got {max_inflight}")
        self.transport = transport
        self.outbox = outbox
        self.station = station
        self.agent_id = agent_id
        self.model_version = model_version
        self.max_inflight = max_inflight
        self._poll_s = poll_s
        t = topics or Topics()
        self.topics = {kind: t.station(station, kind) for kind in t.KINDS}
        self._acks: queue.SimpleQueue[tuple[int, bool, str]] = queue.SimpleQueue()
        self._inflight: dict[int, tuple[str, int]] = {}  # mid -> (sample_id, size); pump thread only
        self._cursor = 0  # highest outbox seq handed to the transport
        self._link_up = False
        self._status_due = False
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # counters
        self._sent = self._acked = self._rejected = self._bytes_sent = self._bytes_acked = 0
        self._results_sent = self._results_dropped = 0
        transport.set_listener(self)
        transport.set_will(self._status_message("offline"))

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the pump thread and the transport. Samples left in the outbox are sent again."""
        if self._thread is not None:
            raise RuntimeError("Uplink already started")
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="uplink", daemon=True)
        self._thread.start()
        self.transport.start()
        log.info("uplink: %d samples (%d bytes) waiting in %s", self.outbox.depth, self.outbox.total_bytes,
                 self.outbox.path)

    def stop(self, timeout: float = 5.0) -> None:
        """Publish "offline" (retained), wait up to ``timeout`` s for it, then disconnect.

        Samples not yet acknowledged stay in the outbox for the next start; the outbox stays
        open (its owner closes it).
        """
        if self._thread is None:
            return
        self._stopping.set()
        self._wake.set()
        self._thread.join()
        self._thread = None
        if self._link_up:
            try:
                mid = self.transport.publish(self._status_message("offline"))
            except TransportError as exc:
                log.warning("uplink: cannot publish offline status: %s", exc)
            else:
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline:
                    try:
                        ack = self._acks.get(timeout=max(deadline - time.monotonic(), 0.001))
                    except queue.Empty:
                        break
                    self._handle_acks([ack])
                    if ack[0] == mid:
                        break
        self.transport.stop()

    def wait_drained(self, timeout: float) -> bool:
        """Wait until the outbox is empty and nothing is in flight; False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.outbox.depth == 0 and not self._inflight:
                return True
            time.sleep(0.02)
        return self.outbox.depth == 0 and not self._inflight

    # -- what the agent sends ------------------------------------------------------------------

    def send_sample(self, sample: SamplePayload) -> bool:
        """Store ``sample`` durably for delivery; False when its id was already waiting.

        Raises ValueError for another station's sample, ContractError when it does not encode,
        OutboxError when it cannot be stored. It fsyncs: call it off the frame loop.
        """
        if sample.station_id != self.station:
            raise ValueError(f"sample {sample.sample_id} is from {sample.station_id}, not this uplink's {self.station}")
        stored = self.outbox.put(sample.sample_id, self.topics["samples"], encode(sample))
        self._wake.set()
        return stored

    def send_result(self, result: ResultPayload) -> bool:
        """Publish per-frame results at QoS 0; False (and counted) when dropped."""
        return self._send_qos0(self.topics["results"], encode(result))

    def send_heartbeat(self, heartbeat: HeartbeatPayload) -> bool:
        """Publish a heartbeat at QoS 0; False (and counted) when dropped."""
        return self._send_qos0(self.topics["heartbeat"], encode(heartbeat))

    def set_model_version(self, version: str) -> None:
        """A new model is live: republish the retained status with it."""
        self.model_version = version
        self._status_due = True
        self._wake.set()

    def counters(self) -> UplinkCounters:
        with self._lock:
            return UplinkCounters(
                connected=self._link_up, sent=self._sent, acked=self._acked, rejected=self._rejected,
                bytes_sent=self._bytes_sent, bytes_acked=self._bytes_acked, inflight=len(self._inflight),
                depth=self.outbox.depth, outbox_bytes=self.outbox.total_bytes, evicted=self.outbox.evicted,
                results_sent=self._results_sent, results_dropped=self._results_dropped,
            )

    # -- transport listener (network thread: never block) --------------------------------------

    def on_connected(self, session_present: bool) -> None:
        self._link_up = True
        self._status_due = True
        self._wake.set()

    def on_disconnected(self, reason: str) -> None:
        self._link_up = False

    def on_ack(self, mid: int, accepted: bool, reason: str) -> None:
        self._acks.put((mid, accepted, reason))
        self._wake.set()

    # -- pump thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(self._poll_s)
            self._wake.clear()
            try:
                self._handle_acks(self._drain_acks())
                if self._link_up and self.transport.connected:
                    if self._status_due:
                        self._status_due = False
                        self.transport.publish(self._status_message("online"))
                    self._fill()
            except TransportError as exc:
                log.warning("uplink: %s", exc)
                self._stopping.wait(1.0)
            except OutboxError as exc:
                log.error("uplink: %s", exc)
                self._stopping.wait(1.0)
            except Exception:  # a bug must not silently end delivery: log it and keep pumping
                log.exception("uplink: unexpected error in the pump; retrying in 1 s")
                self._stopping.wait(1.0)

    def _drain_acks(self) -> list[tuple[int, bool, str]]:
        acks = []
        while True:
            try:
                acks.append(self._acks.get_nowait())
            except queue.Empty:
                return acks

    def _handle_acks(self, acks: list[tuple[int, bool, str]]) -> None:
        delivered: list[str] = []
        delivered_bytes = 0
        for mid, accepted, reason in acks:
            flight = self._inflight.pop(mid, None)
            if flight is None:  # QoS 0 or status
                continue
            sample_id, size = flight
            if accepted:
                delivered.append(sample_id)
                delivered_bytes += size
            else:
                with self._lock:
                    self._rejected += 1
                log.error("uplink: broker refused sample %s (%s); it stays in the outbox until the next start",
                          sample_id, reason)
        if delivered:
            self.outbox.mark_delivered(delivered)
            with self._lock:
                self._acked += len(delivered)
                self._bytes_acked += delivered_bytes

    def _fill(self) -> None:
        room = self.max_inflight - len(self._inflight)
        if room <= 0:
            return
        for item in self.outbox.peek(room, after_seq=self._cursor):
            mid = self.transport.publish(Message(item.topic, item.payload, qos=1))
            self._inflight[mid] = (item.sample_id, len(item.payload))
            self._cursor = item.seq
            with self._lock:
                self._sent += 1
                self._bytes_sent += len(item.payload)

    def _send_qos0(self, topic: str, data: bytes) -> bool:
        ok = False
        if self._link_up:
            try:
                self.transport.publish(Message(topic, data, qos=0))
                ok = True
            except TransportError:
                ok = False
        with self._lock:
            if ok:
                self._results_sent += 1
            else:
                self._results_dropped += 1
        return ok

    def _status_message(self, state: Literal["online", "offline"]) -> Message:
        status = StatusPayload(agent_id=self.agent_id, state=state, model_version=self.model_version, ts=time.time())
        return Message(self.topics["status"], encode(status), qos=1, retain=True)
