"""The uplink against a real Mosquitto (tests/conftest.py): nothing is lost across broker
crashes, agent crashes and network cuts. Unit tests of the pump use MemoryTransport."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.mqtt import MqttConfig, MqttTransport
from edge_agent.outbox import SampleOutbox
from edge_agent.transport import MemoryTransport, Message
from edge_agent.uplink import Uplink
from lineguard_contract import (
    ContractError,
    Detection,
    ResultPayload,
    SamplePayload,
    StationId,
    decode,
    encode,
    new_sample_id,
)

REPO = Path(__file__).resolve().parents[2]
CHILD = Path(__file__).with_name("uplink_child.py")
STATION = StationId("plant1", "lineA", "st03")
JPEG = b"\xff\xd8\xff\xe0" + bytes(2000)


def make_sample(station: StationId = STATION) -> SamplePayload:
    return SamplePayload(
        sample_id=new_sample_id(), site=station.site, line=station.line, station=station.station, camera="cam0",
        capture_ts=time.time(), model_version="1.0.0", reason="defect", width=640, height=480, image=JPEG,
        detections=[Detection(cls="scratch", score=0.9, box=[1.0, 2.0, 30.0, 40.0])],
    )


def wait_until(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


class TcpProxy:
    """Forwards 127.0.0.1:port to the broker; cut() makes the link go silent, as a pulled cable does."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.cut_off = threading.Event()
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            if self.cut_off.is_set():
                client.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self.lock:
                self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                if not self.cut_off.is_set():  # cut: bytes vanish, nobody hears a thing
                    dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            s.close()

    def cut(self) -> None:
        self.cut_off.set()

    def resume(self) -> None:
        with self.lock:  # connections that lived through the cut have lost bytes: end them
            for s in self.conns:
                s.close()
            self.conns.clear()
        self.cut_off.clear()

    def close(self) -> None:
        self.server.close()
        self.resume()


@pytest.fixture
def make_uplink(tmp_path: Path) -> Iterator[Any]:
    made: list[Uplink] = []

    def make(port: int, quota_bytes: int = 1 << 30, **config: Any) -> Uplink:
        cfg = {"client_id": "agent-st03", "host": "127.0.0.1", "port": port, "keepalive_s": 2,
               "reconnect_min_s": 1, "reconnect_max_s": 2, **config}
        outbox = SampleOutbox(tmp_path / f"outbox{len(made)}.db", quota_bytes=quota_bytes)
        uplink = Uplink(MqttTransport(MqttConfig(**cfg)), outbox, STATION, "agent-st03", "1.0.0")
        made.append(uplink)
        return uplink

    yield make
    for uplink in made:
        uplink.stop(timeout=1)
        uplink.outbox.close()


# -- unit: the pump over MemoryTransport -------------------------------------------------------


def test_deleted_only_after_ack_with_bounded_inflight(tmp_path: Path) -> None:
    transport = MemoryTransport(auto_ack=False)
    uplink = Uplink(transport, SampleOutbox(tmp_path / "o.db"), STATION, "agent-st03", "1.0.0", max_inflight=4)
    assert transport.will is not None and decode("status", transport.will.payload).state == "offline"
    assert transport.will.retain and transport.will.qos == 1
    samples = [make_sample() for _ in range(10)]
    for s in samples:
        assert uplink.send_sample(s)
    assert not uplink.send_sample(samples[0])  # same id again: stored once
    uplink.start()
    sent = lambda: [decode("samples", m.payload).sample_id for m in transport.published if m.topic.endswith("samples")]  # noqa: E731
    wait_until(lambda: len(sent()) == 4, 5, "the first window")
    time.sleep(0.1)
    assert sent() == [s.sample_id for s in samples[:4]]  # oldest first, no more than max_inflight
    assert uplink.outbox.depth == 10
    sample_mids = lambda: [mid for mid, m in transport.pending.items() if m.topic.endswith("samples")]  # noqa: E731
    transport.ack(sample_mids()[0])
    wait_until(lambda: len(sent()) == 5, 5, "the window to move")
    assert uplink.outbox.depth == 9 and samples[0].sample_id not in uplink.outbox
    # a refused sample (MQTT 5 negative ack) stays in the outbox and frees its slot
    transport.ack(sample_mids()[0], accepted=False)
    wait_until(lambda: uplink.counters().rejected == 1, 5, "the rejection")
    assert samples[1].sample_id in uplink.outbox
    transport.auto_ack = True
    for mid in list(transport.pending):
        transport.ack(mid)
    wait_until(lambda: uplink.outbox.depth == 1, 5, "the rest to drain")
    c = uplink.counters()
    assert (c.acked, c.rejected, c.sent, c.inflight) == (9, 1, 10, 0)
    assert c.bytes_sent == sum(len(encode(s)) for s in samples)
    assert c.bytes_acked == c.bytes_sent - len(encode(samples[1]))  # all but the refused one
    uplink.stop()
    assert decode("status", transport.published[-1].payload).state == "offline"


def test_results_are_qos0_and_dropped_while_down(tmp_path: Path) -> None:
    transport = MemoryTransport()
    uplink = Uplink(transport, SampleOutbox(tmp_path / "o.db"), STATION, "agent-st03", "1.0.0")
    result = ResultPayload(camera="cam0", frame=1, pts=0.03, ts=time.time(), model_version="1.0.0", detections=[])
    assert not uplink.send_result(result)  # not started: dropped, not queued
    uplink.start()
    assert uplink.send_result(result)
    transport.disconnect()
    assert not uplink.send_result(result)
    c = uplink.counters()
    assert (c.results_sent, c.results_dropped, c.depth) == (1, 2, 0)
    qos0 = [m for m in transport.published if m.topic.endswith("/results")]
    assert len(qos0) == 1 and qos0[0].qos == 0 and decode("results", qos0[0].payload) == result
    with pytest.raises(ValueError, match="not this uplink's"):
        uplink.send_sample(make_sample(StationId("plant1", "lineA", "st04")))
    uplink.stop()


# -- a real broker ---------------------------------------------------------------------------


def test_samples_arrive_intact_and_presence_is_retained(mosquitto_broker: Any, make_uplink: Any,
                                                        mqtt_collector: Any) -> None:
    hub = mqtt_collector(mosquitto_broker.port, kinds=("samples", "results"))
    uplink = make_uplink(mosquitto_broker.port)
    uplink.start()
    samples = [make_sample() for _ in range(20)]
    for s in samples:
        uplink.send_sample(s)
    hub.wait_for({s.sample_id for s in samples}, 10)
    assert all(hub.payloads[s.sample_id] == s for s in samples)  # image bytes and all
    assert uplink.wait_drained(5)
    assert uplink.send_result(ResultPayload(camera="cam0", frame=7, pts=0.2, ts=time.time(), model_version="1.0.0",
                                            detections=[Detection(cls="dent", score=0.5, box=[0, 0, 4, 4])]))
    wait_until(lambda: hub.messages, 5, "the QoS 0 result")
    assert hub.messages[0][1].frame == 7
    # status: a subscriber that arrives later gets the retained "online", then "offline" on stop
    late = mqtt_collector(mosquitto_broker.port, kinds=("status",), client_id="late", clean=True)
    wait_until(lambda: late.messages, 5, "the retained status")
    assert late.messages[0][1].state == "online" and late.messages[0][1].agent_id == "agent-st03"
    uplink.set_model_version("1.1.0")
    wait_until(lambda: len(late.messages) == 2, 5, "the new model version")
    assert late.messages[1][1].model_version == "1.1.0"
    uplink.stop()
    wait_until(lambda: len(late.messages) == 3, 5, "offline")
    assert late.messages[2][1].state == "offline"


def test_broker_sigkill_mid_stream_loses_nothing(mosquitto_broker: Any, make_uplink: Any, mqtt_collector: Any) -> None:
    hub = mqtt_collector(mosquitto_broker.port)
    mosquitto_broker.save()  # the hub's subscription is on disk before the crash
    uplink = make_uplink(mosquitto_broker.port)
    uplink.start()
    produced: list[str] = []

    def produce() -> None:
        for _ in range(240):
            s = make_sample()
            uplink.send_sample(s)
            produced.append(s.sample_id)
            time.sleep(0.008)

    producer = threading.Thread(target=produce)
    producer.start()
    wait_until(lambda: len(hub.samples) >= 60, 10, "the stream to start")
    assert len(produced) < 200
    mosquitto_broker.restart(down_s=0.4)  # SIGKILL, mid-stream
    producer.join()
    assert len(produced) == 240
    hub.wait_for(set(produced), 20)
    assert uplink.wait_drained(10)
    c = uplink.counters()
    assert c.depth == 0 and c.acked >= 240 - c.sent + c.acked and c.acked == c.sent == 240
    assert set(hub.samples) == set(produced)
    logging.getLogger(__name__).info("broker crash: %d duplicates of 240", hub.duplicates())


def run_child(*args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, str(CHILD), *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)


@pytest.mark.parametrize("unreachable", ["broker_down", "link_cut_with_samples_in_flight"])
def test_agent_sigkill_with_full_outbox(unreachable: str, mosquitto_factory: Any, tmp_path: Path,
                                       mqtt_collector: Any) -> None:
    """Killed while nothing can be delivered, restarted with the broker reachable: all 300 arrive."""
    outbox = str(tmp_path / "agent.db")
    if unreachable == "broker_down":
        broker = mosquitto_factory(start=False)
        port, fill = broker.port, run_child("fill", outbox, str(broker.port), "300")
    else:  # connected, then the link goes silent: the first samples are sent but never acknowledged
        broker = mosquitto_factory()
        proxy = TcpProxy(broker.port)
        port, fill = proxy.port, run_child("fill", outbox, str(proxy.port), "300", "go")
        assert fill.stdout is not None and fill.stdin is not None and fill.stdout.readline().strip() == "UP"
        proxy.cut()
        fill.stdin.write("go\n")
        fill.stdin.flush()
    assert fill.stdout is not None
    ids = []
    for line in fill.stdout:
        if line.strip() == "FILLED":
            break
        ids.append(line.strip())
    if unreachable != "broker_down":
        sent = fill.stdout.readline().split()
        assert sent[0] == "SENT" and int(sent[1]) >= 16  # a full window in flight, unacknowledged
    fill.kill()  # SIGKILL
    fill.wait(10)
    assert len(ids) == len(set(ids)) == 300
    if unreachable == "broker_down":
        broker.start()
    else:
        proxy.resume()
    hub = mqtt_collector(broker.port)
    drain = run_child("drain", outbox, str(port))
    out, err = drain.communicate(timeout=40)
    assert drain.returncode == 0, err
    counters = json.loads(out.strip().splitlines()[-1])
    assert counters["depth"] == 0 and counters["acked"] == 300
    hub.wait_for(set(ids), 10)
    assert set(hub.samples) == set(ids)  # zero sample ids lost
    assert hub.duplicates() == 0  # nothing had reached the broker before the kill
    with SampleOutbox(outbox) as box:
        assert box.depth == 0
    if unreachable != "broker_down":
        proxy.close()


def test_agent_sigkill_publishes_the_last_will(mosquitto_broker: Any, tmp_path: Path, mqtt_collector: Any) -> None:
    watcher = mqtt_collector(mosquitto_broker.port, kinds=("status",), client_id="watcher", clean=True)
    agent = run_child("idle", str(tmp_path / "a.db"), str(mosquitto_broker.port))
    assert agent.stdout is not None and agent.stdout.readline().strip() == "UP"
    wait_until(lambda: watcher.messages, 5, "online")
    agent.kill()
    agent.wait(10)
    wait_until(lambda: len(watcher.messages) == 2, 5, "the last will")
    assert [m[1].state for m in watcher.messages] == ["online", "offline"]


def test_network_cut_loses_nothing(mosquitto_broker: Any, make_uplink: Any, mqtt_collector: Any) -> None:
    hub = mqtt_collector(mosquitto_broker.port)
    proxy = TcpProxy(mosquitto_broker.port)
    uplink = make_uplink(proxy.port, keepalive_s=1)
    uplink.start()
    produced: list[str] = []
    for i in range(200):
        s = make_sample()
        uplink.send_sample(s)
        produced.append(s.sample_id)
        if i == 60:
            proxy.cut()
        time.sleep(0.005)
    wait_until(lambda: not uplink.counters().connected, 5, "the agent to notice the cut")
    assert uplink.counters().depth > 100  # nothing got through the cut
    proxy.resume()
    hub.wait_for(set(produced), 20)
    assert uplink.wait_drained(10)
    assert set(hub.samples) == set(produced)
    proxy.close()


def test_outbox_quota_keeps_the_newest(mosquitto_factory: Any, make_uplink: Any,
                                       caplog: pytest.LogCaptureFixture, mqtt_collector: Any) -> None:
    broker = mosquitto_factory(start=False)
    size = len(encode(make_sample()))  # +-2 bytes from sample to sample (the timestamp's digits)
    uplink = make_uplink(broker.port, quota_bytes=size * 25 + 60)
    uplink.start()
    samples = [make_sample() for _ in range(40)]
    with caplog.at_level(logging.WARNING, logger="edge_agent.outbox"):
        for s in samples:
            uplink.send_sample(s)
    c = uplink.counters()
    assert (c.evicted, c.depth, c.sent) == (15, 25, 0)
    assert sum("evicted the 1 oldest samples" in r.getMessage() for r in caplog.records) == 15
    broker.start()
    hub = mqtt_collector(broker.port)
    newest = {s.sample_id for s in samples[15:]}
    hub.wait_for(newest, 15)
    assert uplink.wait_drained(5)
    assert set(hub.samples) == newest


def test_hub_drops_malformed_sample_with_named_field(mosquitto_broker: Any) -> None:
    """What a device with a broken encoder sends reaches the hub; decode names the bad field."""
    received: list[bytes | bytearray] = []
    sub = paho.Client(CallbackAPIVersion.VERSION2, client_id="raw", clean_session=True)
    ready = threading.Event()
    sub.on_subscribe = lambda *a: ready.set()
    sub.on_message = lambda c, u, m: received.append(m.payload)
    sub.connect("127.0.0.1", mosquitto_broker.port)
    sub.subscribe("lineguard/v1/+/+/+/samples", 1)
    sub.loop_start()
    assert ready.wait(5)
    transport = MqttTransport(MqttConfig(client_id="broken", host="127.0.0.1", port=mosquitto_broker.port))
    transport.start()
    wait_until(lambda: transport.connected, 5, "connect")
    doc = json.loads(encode(make_sample()))
    doc["detections"][0]["box"] = [50, 0, 10, 10]
    transport.publish(Message("lineguard/v1/plant1/lineA/st03/samples", json.dumps(doc).encode(), qos=1))
    wait_until(lambda: received, 5, "the message")
    with pytest.raises(ContractError, match="field 'detections.0.box'"):
        decode("samples", received[0])
    transport.stop()
    sub.disconnect()
    sub.loop_stop()
