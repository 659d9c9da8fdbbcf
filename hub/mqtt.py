"""The hub's MQTT client: the only module of the hub that imports paho.

:func:`make_client` builds a paho 2 client from the hub's ``mqtt`` settings (MQTT 3.1.1,
credentials, TLS), for the ingest worker (persistent session, manual acknowledgements) and the
head service. :class:`HeadMqttWorker` connects the :class:`~hub.head_service.HeadService` to the
broker: feature messages of every station at QoS 0 through the shared subscription
``$share/<heads_group>/lineguard/v1/+/+/+/features`` (head processes of one group split the
agents' frames between them, on one machine or many), results published at QoS 0; and, for a
service that loads heads on demand, every station's retained ``model`` announcement (QoS 1, not
shared: each head process loads the announced version's head before the agents swap to it).
"""

from __future__ import annotations

import json
import logging
import ssl
import threading
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from hub.core.config import HubMqttConfig
from lineguard_contract import ContractError, Topics, decode

__all__ = ["HeadMqttWorker", "RetainedPublisher", "make_client", "shared_filter"]

log = logging.getLogger(__name__)
Client = paho.Client
Message = paho.MQTTMessage


def shared_filter(group: str, topic_filter: str) -> str:
    """``$share/<group>/<filter>``: the one place the shared-subscription prefix is written."""
    return f"$share/{group}/{topic_filter}"


def make_client(m: HubMqttConfig, client_id: str, *, clean_session: bool, manual_ack: bool = False) -> Any:
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean_session,
                         protocol=MQTTProtocolVersion.MQTTv311, manual_ack=manual_ack)
    client.reconnect_delay_set(1, 30)
    if m.username is not None:
        client.username_pw_set(m.username, m.password())
    if m.tls:
        client.tls_set(ca_certs=str(m.ca_file) if m.ca_file else None, tls_version=ssl.PROTOCOL_TLS_CLIENT)
    return client


class HeadMqttWorker:
    """Feeds a head service from the broker and publishes its results."""

    def __init__(self, mqtt: HubMqttConfig, service_factory: Any, *, client_id: str, group: str = "lineguard-heads",
                 shared: bool = True) -> None:
        self.mqtt = mqtt
        self.topics = Topics()
        features = self.topics.all_stations("features")
        self.subscription = shared_filter(group, features) if shared else features
        self.subscribed = threading.Event()
        self.service = service_factory(self.publish)
        self.announcements = self.topics.all_stations("model") if getattr(self.service, "loader", None) else None
        self._client = make_client(mqtt, client_id, clean_session=True)
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message

    def publish(self, topic: str, data: bytes) -> None:
        self._client.publish(topic, data, qos=0)

    def start(self) -> None:
        self.service.start()
        self._client.connect_async(self.mqtt.host, self.mqtt.port, self.mqtt.keepalive_s)
        self._client.loop_start()

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()
        self.service.stop()
        log.info("head service stopped; counts %s", json.dumps(self.service.stats(), sort_keys=True))

    def wait_subscribed(self, timeout: float = 10.0) -> bool:
        return self.subscribed.wait(timeout)

    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        if rc.is_failure:
            log.error("broker refused the head service's connection: %s", rc)
            return
        topics = [(self.subscription, 0)] + ([(self.announcements, 1)] if self.announcements else [])
        client.subscribe(topics)

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, rcs: Any, props: Any) -> None:
        if any(rc.is_failure for rc in rcs):
            log.error("head service subscription refused: %s", [str(rc) for rc in rcs])
            return
        log.info("head service subscribed to %s", ", ".join(filter(None, [self.subscription, self.announcements])))
        self.subscribed.set()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        self.subscribed.clear()
        if rc.is_failure:
            log.warning("head service disconnected (%s); paho reconnects", rc)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        try:  # never raise in paho's thread
            topic = msg.topic
        except UnicodeDecodeError:
            topic = "<invalid UTF-8 topic>"
        if self.announcements is None or self._kind(topic) != "model":
            self.service.submit(topic, bytes(msg.payload))  # the service dead-letters what is not features
        elif msg.payload:  # (empty: a cleared announcement)
            try:
                self.service.preload(decode("model", bytes(msg.payload)).version)
            except ContractError as e:
                log.warning("model announcement on %s not understood: %s", topic, e)

    def _kind(self, topic: str) -> str | None:
        try:
            return self.topics.parse(topic)[1]
        except (ContractError, ValueError):
            return None


class RetainedPublisher:
    """Publishes retained QoS 1 messages and waits for the broker's acknowledgement of each
    (model announcements: the broker keeps the last one per station for agents that connect later)."""

    def __init__(self, mqtt: HubMqttConfig, client_id: str) -> None:
        self.mqtt = mqtt
        self._client = make_client(mqtt, client_id, clean_session=True)
        self._connected = threading.Event()
        self._client.on_connect = lambda c, u, f, rc, p: self._connected.set() if not rc.is_failure else None

    def __enter__(self) -> RetainedPublisher:
        self._client.connect_async(self.mqtt.host, self.mqtt.port, self.mqtt.keepalive_s)
        self._client.loop_start()
        if not self._connected.wait(15):
            self.__exit__()
            raise ConnectionError(f"broker {self.mqtt.url} did not accept the connection in 15 s")
        return self

    def __exit__(self, *exc: object) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def publish(self, topic: str, data: bytes, timeout: float = 15.0) -> None:
        info = self._client.publish(topic, data, qos=1, retain=True)
        info.wait_for_publish(timeout)
        if not info.is_published():
            raise ConnectionError(f"{topic}: the broker did not acknowledge the message in {timeout:.0f} s")
