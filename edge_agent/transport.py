"""The small interface between the uplink and a message broker, and an in-memory double.

:class:`Transport` is what :class:`edge_agent.uplink.Uplink` needs from MQTT: publish a
message and hear, by message id, when the broker has acknowledged it. The production
implementation is :class:`edge_agent.mqtt.MqttTransport` (the only module that imports paho);
:class:`MemoryTransport` stands in for it in unit tests and offline runs.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

__all__ = ["Handler", "Message", "Transport", "TransportError", "TransportListener", "MemoryTransport"]


Handler = Callable[[str, bytes], None]


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False


class TransportError(RuntimeError):
    """The transport did not accept a message (not connected for QoS 0, bad topic, queue full)."""


class TransportListener(Protocol):
    """Callbacks from the transport's network thread. They must return quickly and never block."""

    def on_connected(self, session_present: bool) -> None: ...

    def on_disconnected(self, reason: str) -> None: ...

    def on_ack(self, mid: int, accepted: bool, reason: str) -> None: ...


class _NoListener:
    def on_connected(self, session_present: bool) -> None:
        pass

    def on_disconnected(self, reason: str) -> None:
        pass

    def on_ack(self, mid: int, accepted: bool, reason: str) -> None:
        pass


class Transport(ABC):
    """Publishes to a broker, reconnecting on its own.

    The contract the uplink relies on: ``publish`` never waits for the network; a QoS 1
    message it accepted is retransmitted by the transport, across reconnects (an MQTT
    persistent session), until the broker acknowledges it or the transport is stopped;
    ``on_ack`` then fires once for its mid. It may also fire for QoS 0 mids: listeners ignore
    mids they do not know.
    """

    listener: TransportListener = _NoListener()

    def set_listener(self, listener: TransportListener) -> None:
        self.listener = listener

    @abstractmethod
    def set_will(self, message: Message) -> None:
        """The message the broker publishes if this client vanishes. Call before :meth:`start`."""

    @abstractmethod
    def start(self) -> None:
        """Begin connecting in the background; returns at once."""

    @abstractmethod
    def stop(self) -> None:
        """Disconnect cleanly (the will is not sent) and stop the network thread."""

    @property
    @abstractmethod
    def connected(self) -> bool: ...

    @abstractmethod
    def publish(self, message: Message) -> int:
        """Queue ``message``; returns its mid. Raises TransportError when it is not accepted."""

    @abstractmethod
    def subscribe(self, topic_filter: str, handler: Handler) -> None:
        """Deliver messages on ``topic_filter`` (QoS 0) to ``handler(topic, payload)``, from the network
        thread, across reconnects. The handler must return quickly and never raise."""


class MemoryTransport(Transport):
    """An in-process transport: records what is published; the test decides when it is acked.

    ``auto_ack=True`` acks every QoS 1 message as it is published while connected. Unacked
    QoS 1 messages are retransmitted on :meth:`connect`, as a persistent MQTT session does.
    """

    def __init__(self, auto_ack: bool = True) -> None:
        self.auto_ack = auto_ack
        self.published: list[Message] = []  # every transmission, retransmissions included
        self.will: Message | None = None
        self.pending: dict[int, Message] = {}  # QoS 1, not acked yet
        self._connected = False
        self._mid = 0
        self._lock = threading.Lock()
        self.handlers: dict[str, Handler] = {}

    def subscribe(self, topic_filter: str, handler: Handler) -> None:
        self.handlers[topic_filter] = handler

    def deliver(self, topic: str, payload: bytes) -> None:
        """Hand ``payload`` to the handler subscribed to exactly ``topic`` (tests)."""
        self.handlers[topic](topic, payload)

    def set_will(self, message: Message) -> None:
        self.will = message

    def start(self) -> None:
        self.connect()

    def stop(self) -> None:
        with self._lock:
            self._connected = False

    @property
    def connected(self) -> bool:
        return self._connected

    def connect(self, session_present: bool = True) -> None:
        with self._lock:
            self._connected = True
            resend = list(self.pending.items())
            self.published.extend(m for _, m in resend)
        self.listener.on_connected(session_present)
        if self.auto_ack:
            for mid, _ in resend:
                self.ack(mid)

    def disconnect(self, reason: str = "test") -> None:
        with self._lock:
            self._connected = False
        self.listener.on_disconnected(reason)

    def publish(self, message: Message) -> int:
        with self._lock:
            if message.qos == 0 and not self._connected:
                raise TransportError(f"not connected: QoS 0 message to {message.topic} dropped")
            self._mid = self._mid % 65535 + 1
            mid = self._mid
            if message.qos > 0:
                self.pending[mid] = message
            if self._connected:
                self.published.append(message)
            ack_now = self._connected and self.auto_ack and message.qos > 0
        if ack_now:
            self.ack(mid)
        return mid

    def ack(self, mid: int, accepted: bool = True) -> None:
        with self._lock:
            known = self.pending.pop(mid, None) is not None
        if known:
            self.listener.on_ack(mid, accepted, "Success" if accepted else "Not authorized")
