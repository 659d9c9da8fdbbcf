"""The MQTT ingest worker (its paho client comes from :mod:`hub.mqtt`).

- MQTT 3.1.1, persistent session (``clean_session=False``) under a client id that must be
  stable per worker and distinct between workers (``mqtt.client_id``; default
  ``<group>-<hostname>``): the broker queues samples for a worker while it is down.
- Samples are subscribed at QoS 1 through a **shared subscription**,
  ``$share/<group>/lineguard/v1/+/+/+/samples``: the workers of one group split them, each
  message going to one of them. Status and heartbeat are subscribed **without** sharing, so
  every worker sees every station's presence (retained status messages are not delivered to
  shared subscriptions); a malformed status/heartbeat is thus dead-lettered by each worker.
- **Batches**: paho's network thread only queues each message; an ingest thread takes up to
  ``batch_max`` of them (waiting at most ``batch_ms`` for more once it has one) and hands them to
  :meth:`~hub.pipeline.IngestPipeline.handle_batch`: one transaction, blobs written a few at a
  time. The broker keeps sending while a batch commits, up to its in-flight window (Mosquitto's
  ``max_inflight_messages``, 20 by default: batches are at most that large).
- **Acknowledge after commit**: the client runs with ``manual_ack=True``; the PUBACKs of a batch
  are sent once its transaction has committed (stored, duplicate or dead letter), in the order the
  PUBLISHes came, as MQTT 3.1.1 requires. A hub that dies before the commit never acknowledged
  the messages, so the broker delivers them again to the session, and the unique ``sample_id``
  turns a redelivery into a no-op.
- When the database fails (after the pipeline's retries) the batch is left unacknowledged and
  counted under ``errors``; the worker then drops what it has queued, waits (1 s, doubling up to
  30 s while failures go on) and reconnects, so that the broker delivers the unacknowledged
  messages again, in order (MQTT 3.1.1 resends only on a reconnect). A message queued on an
  earlier connection is never acknowledged on a later one.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

from hub.blobs import BlobStore, FileBlobStore
from hub.core.config import HubConfig
from hub.core.db import make_engine, make_session_factory, upgrade
from hub.mqtt import make_client, shared_filter
from hub.pipeline import IngestError, IngestPipeline
from lineguard_contract import Topics

__all__ = ["IngestWorker", "shared_filter"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _Received:
    topic: str
    payload: bytes
    mid: int
    qos: int
    connection: int  # which connection of this client it came on (acks go on that one only)


class IngestWorker:
    """``start()`` migrates the database to head, connects and subscribes; ``stop()`` disconnects.

    ``client_id`` overrides ``config.mqtt.client_id`` (two workers on one host need two ids).
    ``batch_max`` messages at most per transaction, ``batch_ms`` to wait for more once one is
    there; ``retry_s`` is the first wait before reconnecting after a database failure.
    """

    def __init__(self, config: HubConfig, *, client_id: str | None = None, blobs: BlobStore | None = None,
                 migrate: bool = True, batch_max: int = 100, batch_ms: float = 20.0, retry_s: float = 1.0) -> None:
        self.config = config
        self.client_id = client_id or config.mqtt.resolved_client_id()
        self.migrate = migrate
        self.batch_max, self.batch_ms, self.retry_s = max(1, batch_max), batch_ms, retry_s
        self.engine = make_engine(config.db_url)
        self.pipeline = IngestPipeline(make_session_factory(self.engine), blobs or FileBlobStore(config.blob_dir),
                                       max_payload_bytes=config.max_payload_bytes)
        self.topics = Topics()
        samples = self.topics.all_stations("samples")
        # The embedded broker (rumqttd 0.20) panics when a lone persistent $share member reconnects with
        # unacknowledged messages (docs/hub.md); it serves one hub process, which needs no sharing.
        self.subscriptions = [
            (samples if config.embedded_broker else shared_filter(config.mqtt.shared_group, samples), 1),
            (self.topics.all_stations("status"), 1),
            (self.topics.all_stations("heartbeat"), 1),
        ]
        self.subscribed = threading.Event()
        self._errors = 0
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[_Received] = queue.SimpleQueue()
        self._connection = 0  # counts connects; a message remembers the one it came on
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._client = self._make_client()

    def _make_client(self) -> Any:
        client = make_client(self.config.mqtt, self.client_id, clean_session=False, manual_ack=True)
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        return client

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        if self.migrate:
            upgrade(self.engine)
        self.config.data_dir.mkdir(parents=True, exist_ok=True)
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name=f"ingest-{self.client_id}", daemon=True)
        self._thread.start()
        self._connect()

    def _connect(self) -> None:
        m = self.config.mqtt
        self._client.connect_async(m.host, m.port, m.keepalive_s)
        self._client.loop_start()

    def wait_subscribed(self, timeout: float = 10.0) -> bool:
        return self.subscribed.wait(timeout)

    def stop(self) -> None:
        """Finish (commit and acknowledge) the batch in hand, then disconnect."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._client.disconnect()
        self._client.loop_stop()
        self.pipeline.close()
        self.engine.dispose()

    def counters(self) -> dict[str, int]:
        """``stored``, ``duplicate``, ``dead_letter``, ``status``, ``heartbeat``, ``errors``."""
        with self._lock:
            errors = self._errors
        return {**self.pipeline.counters(), "errors": errors}

    # -- paho callbacks (network thread) ------------------------------------------------------
    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        if rc.is_failure:
            log.error("broker refused the connection: %s", rc)
            return
        self._connection += 1
        log.info("connected as %s (session present: %s)", self.client_id, flags.session_present)
        client.subscribe(self.subscriptions)  # every connect: the broker may have lost the session

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, rcs: Any, props: Any) -> None:
        refused = [str(rc) for rc in rcs if rc.is_failure]
        if refused:
            log.error("subscription refused: %s", refused)
            return
        self.subscribed.set()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        self.subscribed.clear()
        if rc.is_failure:
            log.warning("disconnected (%s); paho reconnects", rc)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        # Never raise here: an exception would end paho's network thread.
        try:
            topic = msg.topic
        except UnicodeDecodeError:
            topic = "<invalid UTF-8 topic>"
        self._queue.put(_Received(topic, bytes(msg.payload), msg.mid, msg.qos, self._connection))

    # -- ingest thread ------------------------------------------------------------------------
    def _run(self) -> None:
        backoff = self.retry_s
        while not self._stopping.is_set():
            batch = self._next_batch()
            if not batch:
                continue
            if self._ingest(batch):
                backoff = self.retry_s
                continue
            if self._stopping.wait(backoff):  # let the database come back, then have the broker resend
                return
            backoff = min(backoff * 2, 30.0)
            self._reconnect()

    def _next_batch(self) -> list[_Received]:
        try:
            batch = [self._queue.get(timeout=0.1)]
        except queue.Empty:
            return []
        deadline = time.monotonic() + self.batch_ms / 1000
        while len(batch) < self.batch_max:
            try:
                batch.append(self._queue.get(timeout=max(deadline - time.monotonic(), 0)))
            except queue.Empty:
                break
        return batch

    def _ingest(self, batch: list[_Received]) -> bool:
        """Ingest ``batch`` and acknowledge what was committed; False when the database failed."""
        try:
            self.pipeline.handle_batch([(m.topic, m.payload) for m in batch])
            committed = len(batch)
        except Exception as e:  # IngestError, or a bug: never end this thread over a message
            committed = len(e.outcomes) if isinstance(e, IngestError) else 0
            with self._lock:
                self._errors += len(batch) - committed
            log.error("could not ingest %d message(s) (%s); not acknowledged, the broker resends them after "
                      "the reconnect", len(batch) - committed, e, exc_info=e)
        for m in batch[:committed]:
            if m.qos > 0 and m.connection == self._connection:
                self._client.ack(m.mid, m.qos)
        return committed == len(batch)

    def _reconnect(self) -> None:
        log.warning("reconnecting so that the broker delivers the unacknowledged messages again")
        self._client.disconnect()
        self._client.loop_stop()
        while True:  # what came on the closed connection comes again on the next
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._connect()
