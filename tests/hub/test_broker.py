"""The hub's embedded broker (hub/broker.py, rumqttd via iotcore) against real paho-mqtt 2 clients
speaking MQTT 3.1.1: QoS 1, retained messages, shared subscriptions, LineGuard-sized payloads,
persistent sessions, and the process lifecycle (port in use, stop frees the port, crash)."""

from __future__ import annotations

import hashlib
import os
import queue
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from hub.broker import MAX_PACKET_BYTES, EmbeddedBroker
from lineguard_contract import MAX_PAYLOAD_BYTES

paho = pytest.importorskip("paho.mqtt.client")
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

SHARED = "$share/g/lineguard/v1/+/+/+/samples"


def free_port() -> int:  # as tests/conftest.py
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Peer:
    """A paho client (MQTT 3.1.1) on its own network thread; received messages queue up in ``inbox``."""

    def __init__(self, port: int, client_id: str, clean: bool = True) -> None:
        self.inbox: queue.Queue[Any] = queue.Queue()
        self.suback = threading.Event()
        self.disconnected = threading.Event()
        connected = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean,
                                  protocol=paho.MQTTv311)
        self.client.on_connect = lambda c, u, f, rc, p: None if rc.is_failure else connected.set()
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self.suback.set()
        self.client.on_message = lambda c, u, msg: self.inbox.put(msg)
        self.client.on_disconnect = lambda c, u, f, rc, p: self.disconnected.set()
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()
        assert connected.wait(5), f"{client_id} could not connect"

    def subscribe(self, topic: str, qos: int = 1) -> None:
        self.suback.clear()
        self.client.subscribe(topic, qos)
        assert self.suback.wait(5), f"no SUBACK for {topic}"

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(10)
        assert info.is_published(), f"publish to {topic} not acknowledged"

    def drain(self, quiet: float = 0.3) -> list[Any]:
        """Everything received until nothing arrives for ``quiet`` seconds."""
        out = []
        while True:
            try:
                out.append(self.inbox.get(timeout=quiet))
            except queue.Empty:
                return out

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker(port=free_port(), workdir=tmp_path / "broker") as b:
        yield b


@pytest.fixture
def peers(broker: EmbeddedBroker) -> Iterator[Callable[..., Peer]]:
    """``make(client_id, clean=True) -> Peer`` connected to ``broker``; all closed at teardown."""
    made: list[Peer] = []

    def make(client_id: str, clean: bool = True) -> Peer:
        made.append(Peer(broker.port, client_id, clean))
        return made[-1]

    yield make
    for p in made:
        p.close()


def test_lifecycle_url_and_config(tmp_path: Path) -> None:
    port = free_port()
    b = EmbeddedBroker(port=port, workdir=tmp_path)
    assert (b.url, b.running) == (f"mqtt://127.0.0.1:{port}", False)
    with b:
        assert b.running
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    assert not b.running
    b.stop()  # idempotent
    config = (tmp_path / "rumqttd.toml").read_text()
    assert f'listen = "127.0.0.1:{port}"' in config
    assert f"max_payload_size = {MAX_PACKET_BYTES}" in config and MAX_PACKET_BYTES > MAX_PAYLOAD_BYTES
    assert "listening on 127.0.0.1:" in (tmp_path / "broker.log").read_text()


@pytest.mark.parametrize(("sub_qos", "pub_qos", "received_qos"), [(1, 1, 1), (0, 1, 0), (2, 1, 2)])
def test_publish_receive(peers: Callable[..., Peer], sub_qos: int, pub_qos: int, received_qos: int) -> None:
    sub, pub = peers("sub"), peers("pub")
    sub.subscribe("lineguard/v1/+/+/+/samples", sub_qos)
    pub.publish("lineguard/v1/p1/lA/st03/samples", b"hello", qos=pub_qos)
    msg = sub.inbox.get(timeout=5)
    assert (msg.topic, msg.payload, msg.qos, msg.retain) == ("lineguard/v1/p1/lA/st03/samples", b"hello",
                                                             received_qos, False)
    assert sub.drain() == []  # exactly once here


@pytest.mark.parametrize(("publishes", "expected"), [
    pytest.param([(b"online", True)], [b"online"], id="retained"),
    pytest.param([(b"v1", True), (b"v2", True)], [b"v2"], id="last-one-wins"),
    pytest.param([(b"online", True), (b"", True)], [], id="empty-clears"),
    pytest.param([(b"online", False)], [], id="not-retained"),
])
def test_retained_for_later_subscriber(peers: Callable[..., Peer], publishes: list[tuple[bytes, bool]],
                                       expected: list[bytes]) -> None:
    pub = peers("pub")
    for payload, retain in publishes:
        pub.publish("lineguard/v1/p1/lA/st03/status", payload, retain=retain)
    late = peers("late")
    late.subscribe("lineguard/v1/+/+/+/status")
    got = late.drain(0.5)
    assert [m.payload for m in got] == expected
    assert all(m.retain for m in got)


def test_shared_subscription_splits_messages(peers: Callable[..., Peer]) -> None:
    a, b, pub = peers("hub-a"), peers("hub-b"), peers("edge")
    a.subscribe(SHARED)
    b.subscribe(SHARED)
    sent = {f"s{i:02d}".encode() for i in range(40)}
    for i, payload in enumerate(sorted(sent)):
        pub.publish(f"lineguard/v1/p1/lA/st{i % 4:02d}/samples", payload)
    got_a, got_b = [m.payload for m in a.drain(0.5)], [m.payload for m in b.drain(0.1)]
    assert sorted(got_a + got_b) == sorted(sent)  # each message to exactly one of the group
    assert got_a and got_b, (len(got_a), len(got_b))


@pytest.mark.parametrize(("size", "delivered"), [
    pytest.param(1 << 20, True, id="1MiB"),
    pytest.param(MAX_PAYLOAD_BYTES, True, id="4MiB-contract-max"),
    pytest.param(MAX_PACKET_BYTES + 1, False, id="over-packet-limit"),  # the broker drops the connection
])
def test_large_payloads(peers: Callable[..., Peer], size: int, delivered: bool) -> None:
    sub, pub = peers("sub"), peers("pub")
    sub.subscribe("lineguard/v1/+/+/+/samples")
    payload = os.urandom(size)
    if delivered:
        pub.publish("lineguard/v1/p1/lA/st03/samples", payload)
        msg = sub.inbox.get(timeout=5)
        assert hashlib.sha256(msg.payload).digest() == hashlib.sha256(payload).digest()
    else:
        pub.client.publish("lineguard/v1/p1/lA/st03/samples", payload, qos=1)
        assert pub.disconnected.wait(5), "oversized packet was accepted"
        assert sub.drain() == []


def test_persistent_session_gets_what_it_missed(peers: Callable[..., Peer]) -> None:
    hub = peers("hub", clean=False)
    hub.subscribe("lineguard/v1/+/+/+/samples")
    hub.close()
    pub = peers("edge")
    for i in range(5):
        pub.publish("lineguard/v1/p1/lA/st03/samples", b"%d" % i)
    back = peers("hub", clean=False)  # no new SUBSCRIBE: the session kept it
    assert [m.payload for m in back.drain(0.5)] == [b"0", b"1", b"2", b"3", b"4"]


@pytest.mark.parametrize("holder", ["socket", "broker"])
def test_start_on_taken_port_raises(tmp_path: Path, holder: str) -> None:
    port = free_port()
    with socket.socket() as s:
        if holder == "socket":
            s.bind(("127.0.0.1", port))
            s.listen()
            other = None
        else:
            other = EmbeddedBroker(port=port, workdir=tmp_path / "first")
            other.start()
        try:
            b = EmbeddedBroker(port=port, workdir=tmp_path / "second")
            started = time.monotonic()
            with pytest.raises(RuntimeError, match=f"could not listen on 127.0.0.1:{port}") as err:
                b.start()
            assert "Address already in use" in str(err.value)
            assert time.monotonic() - started < 5 and not b.running
            b.stop()  # nothing to stop; no error
        finally:
            if other is not None:
                other.stop()


def test_stop_frees_the_port(tmp_path: Path) -> None:
    port = free_port()
    first = EmbeddedBroker(port=port, workdir=tmp_path / "first")
    first.start()
    client = Peer(port, "connected-at-stop")  # an established connection while the broker stops
    first.stop()
    assert client.disconnected.wait(5)
    client.client.loop_stop()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    with EmbeddedBroker(port=port, workdir=tmp_path / "second") as second:
        sub, pub = Peer(port, "sub"), Peer(port, "pub")
        sub.subscribe("t/#")
        pub.publish("t/1", b"again")
        assert sub.inbox.get(timeout=5).payload == b"again"
        sub.close()
        pub.close()
        assert second.running


def kill_the_process(broker: EmbeddedBroker) -> None:
    assert broker.pid is not None
    os.kill(broker.pid, signal.SIGKILL)


def panic_the_router(broker: EmbeddedBroker) -> None:
    """rumqttd 0.20 bug: a persistent session alone in a $share group leaves with a QoS 1 message unacked."""
    worker = paho.Client(CallbackAPIVersion.VERSION2, client_id="hub-w1", clean_session=False,
                         protocol=paho.MQTTv311, manual_ack=True)  # never acks
    got = threading.Event()
    worker.on_message = lambda c, u, msg: got.set()
    worker.connect("127.0.0.1", broker.port, keepalive=30)
    worker.loop_start()
    worker.subscribe(SHARED, 1)
    edge = Peer(broker.port, "edge")
    deadline = time.monotonic() + 5
    while not got.is_set() and time.monotonic() < deadline:  # the SUBACK may not have been processed yet
        edge.publish("lineguard/v1/p1/lA/st03/samples", b"unacked")
        got.wait(0.2)
    worker.disconnect()
    worker.loop_stop()
    edge.close()


@pytest.mark.parametrize(("crash", "code", "says"), [
    pytest.param(kill_the_process, -9, "", id="sigkill"),
    pytest.param(panic_the_router, 70, "group must exists", id="router-panic"),  # the child's watchdog exits
])
def test_crash_is_reported_not_raised(broker: EmbeddedBroker, caplog: pytest.LogCaptureFixture,
                                      crash: Callable[[EmbeddedBroker], None], code: int, says: str) -> None:
    crash(broker)
    deadline = time.monotonic() + 3
    while broker.running and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not broker.running
    with caplog.at_level("WARNING", logger="hub.broker"):
        broker.stop()  # no exception: the hub carries on
    assert f"had exited with code {code}" in caplog.text and says in caplog.text
    broker.start()  # a fresh broker on the same port
    assert broker.running
