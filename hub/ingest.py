"""The MQTT ingest worker: the only module of the hub that imports paho.

- MQTT 3.1.1, persistent session (``clean_session=False``) under a client id that must be
  stable per worker and distinct between workers (``mqtt.client_id``; default
  ``<group>-<hostname>``): the broker queues samples for a worker while it is down.
- Samples are subscribed at QoS 1 through a **shared subscription**,
  ``$share/<group>/lineguard/v1/+/+/+/samples``: the workers of one group split them, each
  message going to one of them. Status and heartbeat are subscribed **without** sharing, so
  every worker sees every station's presence (retained status messages are not delivered to
  shared subscriptions); a malformed status/heartbeat is thus dead-lettered by each worker.
- **Acknowledge after commit**: the client runs with ``manual_ack=True``; a message's PUBACK
  is sent only once :class:`~hub.pipeline.IngestPipeline` has committed it (stored, duplicate or
  dead letter). A hub that dies before the commit never acknowledged the message, so the broker
  delivers it again to the session, and the unique ``sample_id`` turns a redelivery into a no-op.
  When the database fails (after the pipeline's retries) the message is left unacknowledged,
  counted under ``errors``, and comes again after the next reconnect of this session.
- Messages are handled in paho's network thread, in arrival order, so PUBACKs leave in the
  order the PUBLISHes came, as MQTT 3.1.1 requires.
"""

from __future__ import annotations

import logging
import ssl
import threading
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from hub.blobs import BlobStore, FileBlobStore
from hub.core.config import HubConfig
from hub.core.db import make_engine, make_session_factory, upgrade
from hub.pipeline import IngestPipeline
from lineguard_contract import Topics

__all__ = ["IngestWorker", "shared_filter"]

log = logging.getLogger(__name__)


def shared_filter(group: str, topic_filter: str) -> str:
    """``$share/<group>/<filter>``: the one place the shared-subscription prefix is written."""
    return f"$share/{group}/{topic_filter}"


class IngestWorker:
    """``start()`` migrates the database to head, connects and subscribes; ``stop()`` disconnects.

    ``client_id`` overrides ``config.mqtt.client_id`` (two workers on one host need two ids).
    """

    def __init__(self, config: HubConfig, *, client_id: str | None = None, blobs: BlobStore | None = None,
                 migrate: bool = True) -> None:
        self.config = config
        self.client_id = client_id or config.mqtt.resolved_client_id()
        self.migrate = migrate
        self.engine = make_engine(config.db_url)
        self.pipeline = IngestPipeline(make_session_factory(self.engine), blobs or FileBlobStore(config.blob_dir),
                                       max_payload_bytes=config.max_payload_bytes)
        self.topics = Topics()
        self.subscriptions = [
            (shared_filter(config.mqtt.shared_group, self.topics.all_stations("samples")), 1),
            (self.topics.all_stations("status"), 1),
            (self.topics.all_stations("heartbeat"), 1),
        ]
        self.subscribed = threading.Event()
        self._errors = 0
        self._lock = threading.Lock()
        self._client = self._make_client()

    def _make_client(self) -> paho.Client:
        m = self.config.mqtt
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, clean_session=False,
                             protocol=MQTTProtocolVersion.MQTTv311, manual_ack=True)
        client.reconnect_delay_set(1, 30)
        if m.username is not None:
            client.username_pw_set(m.username, m.password())
        if m.tls:
            client.tls_set(ca_certs=str(m.ca_file) if m.ca_file else None, tls_version=ssl.PROTOCOL_TLS_CLIENT)
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
        m = self.config.mqtt
        self._client.connect_async(m.host, m.port, m.keepalive_s)
        self._client.loop_start()

    def wait_subscribed(self, timeout: float = 10.0) -> bool:
        return self.subscribed.wait(timeout)

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()
        self.engine.dispose()

    def counters(self) -> dict[str, int]:
        """``stored``, ``duplicate``, ``dead_letter``, ``status``, ``heartbeat``, ``errors``."""
        with self._lock:
            errors = self._errors
        return {**self.pipeline.counters(), "errors": errors}

    # -- paho callbacks (network thread) ------------------------------------------------------
    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        if rc.is_failure:
            log.error("broker refused the connection: %s", rc)
            return
        log.info("connected as %s (session present: %s)", self.client_id, flags.session_present)
        client.subscribe(self.subscriptions)  # every connect: the broker may have lost the session

    def _on_subscribe(self, client: paho.Client, userdata: Any, mid: int, rcs: Any, props: Any) -> None:
        refused = [str(rc) for rc in rcs if rc.is_failure]
        if refused:
            log.error("subscription refused: %s", refused)
            return
        self.subscribed.set()

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        self.subscribed.clear()
        if rc.is_failure:
            log.warning("disconnected (%s); paho reconnects", rc)

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        # Never raise here: an exception would end paho's network thread.
        try:
            try:
                topic = msg.topic
            except UnicodeDecodeError:
                topic = "<invalid UTF-8 topic>"
            self.pipeline.handle(topic, bytes(msg.payload))
        except Exception:
            with self._lock:
                self._errors += 1
            log.exception("could not ingest a message (mid %d); not acknowledged, the broker resends it "
                          "after the next reconnect", msg.mid)
            return
        client.ack(msg.mid, msg.qos)

