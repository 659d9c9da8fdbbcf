"""MQTT transport on paho-mqtt 2.x. The only module of the agent that imports paho.

- MQTT 3.1.1 by default; MQTT 5 where ``MqttConfig.protocol == "5"``.
- Persistent session: ``clean_session=False`` (3.1.1), or ``clean_start=False`` with a session
  expiry interval (5), under a client id that must be stable per agent. The broker keeps the
  session across disconnects; paho keeps every unacknowledged QoS 1 message and retransmits
  it (DUP flag) after each reconnect, so an accepted publish is never dropped by this process.
- A PUBACK (or, in MQTT 5, a PUBACK with a reason code below 0x80) is reported through
  ``listener.on_ack(mid, accepted=True, ...)``; a refusing reason code gives ``accepted=False``.
- Reconnects with paho's capped exponential backoff (``reconnect_min_s`` doubling up to
  ``reconnect_max_s``); the first connection is retried the same way.
- Username/password and TLS (CA file, client certificate and key) options.

paho numbers QoS 0 and QoS 1 publishes from one 16-bit counter and reports both through
``on_publish``; a QoS 0 report could only be mistaken for a pending QoS 1 acknowledgement if
65,535 messages were published while that one QoS 1 message waited for its PUBACK.
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edge_agent.transport import Handler, Message, Transport, TransportError

__all__ = ["MqttConfig", "TlsOptions", "MqttTransport"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TlsOptions:
    """TLS to the broker. ``ca_file=None`` trusts the system CAs; cert and key authenticate the device."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    insecure_skip_hostname: bool = False  # lab use only: accepts a certificate for another host name


@dataclass(frozen=True)
class MqttConfig:
    client_id: str  # stable per agent: the broker keys the persistent session on it
    host: str = "localhost"
    port: int = 1883
    protocol: Literal["3.1.1", "5"] = "3.1.1"
    keepalive_s: int = 30
    username: str | None = None
    password: str | None = None
    tls: TlsOptions | None = None
    reconnect_min_s: int = 1
    reconnect_max_s: int = 60
    session_expiry_s: int = 7 * 24 * 3600  # MQTT 5 only; 3.1.1 sessions last until the broker drops them
    max_inflight: int = 64  # paho's own window; keep it above the uplink's

    def __post_init__(self) -> None:
        if not self.client_id:
            raise ValueError("client_id must be set: a persistent session needs a stable client id")
        if not 1 <= self.reconnect_min_s <= self.reconnect_max_s:
            raise ValueError(f"need 1 <= reconnect_min_s ({self.reconnect_min_s}) <= reconnect_max_s "
                             f"({self.reconnect_max_s})")
        if self.password is not None and self.username is None:
            raise ValueError("a password needs a username")


class MqttTransport(Transport):
    """:class:`Transport` over one paho client and its network thread (``loop_start``)."""

    def __init__(self, config: MqttConfig) -> None:
        self.config = config
        v5 = config.protocol == "5"
        self._v5 = v5
        self._client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=config.client_id,
            clean_session=None if v5 else False,
            protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
        )
        self._client.max_inflight_messages_set(config.max_inflight)
        self._client.max_queued_messages_set(0)  # unbounded: the uplink bounds what it hands over
        self._client.reconnect_delay_set(config.reconnect_min_s, config.reconnect_max_s)
        if config.username is not None:
            self._client.username_pw_set(config.username, config.password)
        if config.tls is not None:
            t = config.tls
            self._client.tls_set(
                ca_certs=str(t.ca_file) if t.ca_file else None,
                certfile=str(t.cert_file) if t.cert_file else None,
                keyfile=str(t.key_file) if t.key_file else None,
                cert_reqs=ssl.CERT_REQUIRED,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
            if t.insecure_skip_hostname:
                self._client.tls_insecure_set(True)
        self._client.on_connect = self._on_connect
        self._client.on_connect_fail = self._on_connect_fail
        self._client.on_disconnect = self._on_disconnect
        self._client.on_publish = self._on_publish
        self._client.on_message = self._on_message
        self._handlers: dict[str, Handler] = {}
        self._started = False

    def set_will(self, message: Message) -> None:
        if self._started:
            raise RuntimeError("set_will() must come before start()")
        self._client.will_set(message.topic, message.payload, qos=message.qos, retain=message.retain)

    def start(self) -> None:
        c = self.config
        if self._v5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = c.session_expiry_s
            self._client.connect_async(c.host, c.port, c.keepalive_s, clean_start=False, properties=props)
        else:
            self._client.connect_async(c.host, c.port, c.keepalive_s)
        self._client.loop_start()
        self._started = True
        log.info("mqtt: connecting to %s:%d as %r (MQTT %s%s)", c.host, c.port, c.client_id, c.protocol,
                 ", TLS" if c.tls else "")

    def stop(self) -> None:
        if not self._started:
            return
        self._client.disconnect()
        self._client.loop_stop()
        self._started = False

    @property
    def connected(self) -> bool:
        return self._client.is_connected()

    def publish(self, message: Message) -> int:
        try:
            info = self._client.publish(message.topic, message.payload, qos=message.qos, retain=message.retain)
        except ValueError as exc:  # bad topic, QoS or size
            raise TransportError(f"publish to {message.topic}: {exc}") from exc
        rc = info.rc
        if rc == MQTTErrorCode.MQTT_ERR_SUCCESS or (rc == MQTTErrorCode.MQTT_ERR_NO_CONN and message.qos > 0):
            return int(info.mid)  # a QoS 1 message with no connection is queued and sent on reconnect
        raise TransportError(f"publish to {message.topic} not accepted: {paho.error_string(rc)}")

    def subscribe(self, topic_filter: str, handler: Handler) -> None:
        self._handlers[topic_filter] = handler
        if self._client.is_connected():
            self._client.subscribe(topic_filter, qos=0)

    # -- paho callbacks (network thread) -------------------------------------------------------

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        for topic_filter, handler in list(self._handlers.items()):
            if paho.topic_matches_sub(topic_filter, msg.topic):
                try:
                    handler(msg.topic, bytes(msg.payload))
                except Exception:  # never end paho's network thread
                    log.exception("mqtt: handler for %s failed", topic_filter)

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode,
                    properties: Properties | None) -> None:
        if reason.is_failure:
            log.warning("mqtt: %s:%d refused the connection: %s", self.config.host, self.config.port, reason)
            return
        present = bool(getattr(flags, "session_present", False))
        log.info("mqtt: connected to %s:%d (session present: %s)", self.config.host, self.config.port, present)
        for topic_filter in list(self._handlers):  # every connect: a clean or lost session forgets them
            client.subscribe(topic_filter, qos=0)
        self.listener.on_connected(present)

    def _on_connect_fail(self, client: paho.Client, userdata: Any) -> None:
        log.debug("mqtt: cannot reach %s:%d; retrying with backoff", self.config.host, self.config.port)

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode,
                       properties: Properties | None) -> None:
        level = logging.WARNING if reason.is_failure else logging.INFO
        log.log(level, "mqtt: disconnected from %s:%d: %s", self.config.host, self.config.port, reason)
        self.listener.on_disconnected(str(reason))

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int, reason: ReasonCode,
                    properties: Properties | None) -> None:
        self.listener.on_ack(mid, not reason.is_failure, str(reason))
