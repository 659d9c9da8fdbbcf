"""MQTT security against a real Mosquitto: TLS with client certificates, per-device passwords,
MQTT 5 reason codes, and the example broker config and ACL in deploy/mosquitto/."""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from edge_agent.mqtt import MqttConfig, MqttTransport, TlsOptions
from edge_agent.outbox import SampleOutbox
from edge_agent.transport import Message
from edge_agent.uplink import Uplink
from lineguard_contract import Detection, SamplePayload, StationId, encode, new_sample_id

REPO = Path(__file__).resolve().parents[2]
STATION = StationId("plant1", "lineA", "st03")
needs_tools = pytest.mark.skipif(not (shutil.which("openssl") and shutil.which("mosquitto_passwd")),
                                 reason="needs openssl and mosquitto_passwd (Debian: openssl, mosquitto)")


def make_sample() -> SamplePayload:
    return SamplePayload(
        sample_id=new_sample_id(), site=STATION.site, line=STATION.line, station=STATION.station, camera="cam0",
        capture_ts=time.time(), model_version="1.0.0", reason="defect", width=640, height=480,
        image=b"\xff\xd8\xff\xe0" + bytes(2000), detections=[Detection(cls="scratch", score=0.9, box=[1, 2, 30, 40])],
    )


def wait_until(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_pki(d: Path) -> dict[str, Path]:
    """A throwaway CA, a broker certificate for 127.0.0.1 and a device certificate (EC P-256)."""
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("req", "-x509", "-new", *key, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=test-ca")
    (d / "san.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    for name, cn, ext in (("broker", "127.0.0.1", ["-extfile", "san.cnf"]), ("device", "plant1-lineA-st03", [])):
        run("req", "-new", *key, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-days", "2", "-out", f"{name}.crt", *ext)
    return {n: d / n for n in ("ca.crt", "broker.crt", "broker.key", "device.crt", "device.key")}


class AckRecorder:
    def __init__(self) -> None:
        self.acks: list[tuple[int, bool, str]] = []
        self.up = threading.Event()

    def on_connected(self, session_present: bool) -> None:
        self.up.set()

    def on_disconnected(self, reason: str) -> None:
        self.up.clear()

    def on_ack(self, mid: int, accepted: bool, reason: str) -> None:
        self.acks.append((mid, accepted, reason))


@needs_tools
def test_tls_passwords_and_the_deploy_acl_over_mqtt5(mosquitto_factory: Any, mqtt_collector: Any, tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    pki = make_pki(tmp_path)
    passwd = tmp_path / "passwd"
    users = {"lineguard-hub": "hub-pw", "plant1-lineA-st03": "st03-pw", "plant1-lineA-st04": "st04-pw"}
    for i, (user, pw) in enumerate(users.items()):
        subprocess.run(["mosquitto_passwd", *(["-c"] if i == 0 else []), "-b", str(passwd), user, pw], check=True)
    hub_port = free_port()
    broker = mosquitto_factory(
        f"cafile {pki['ca.crt']}\ncertfile {pki['broker.crt']}\nkeyfile {pki['broker.key']}\n"
        f"require_certificate true\nlistener {hub_port} 127.0.0.1\n"  # the hub's plain listener, same ACL
        f"allow_anonymous false\npassword_file {passwd}\nacl_file {REPO / 'deploy/mosquitto/acl'}\n"
    )
    hub = mqtt_collector(hub_port, username="lineguard-hub", password="hub-pw")
    tls = TlsOptions(ca_file=pki["ca.crt"], cert_file=pki["device.crt"], key_file=pki["device.key"])
    device = MqttConfig(client_id="agent-st03", host="127.0.0.1", port=broker.port, protocol="5",
                        username="plant1-lineA-st03", password="st03-pw", tls=tls)
    uplink = Uplink(MqttTransport(device), SampleOutbox(tmp_path / "o.db"), STATION, "agent-st03", "1.0.0")
    uplink.start()
    samples = [make_sample() for _ in range(5)]
    for s in samples:
        uplink.send_sample(s)
    hub.wait_for({s.sample_id for s in samples}, 10)
    assert uplink.wait_drained(5) and uplink.counters().rejected == 0
    uplink.stop()
    # the ACL: st03's credentials may not write st04's topics; MQTT 5 says so in the PUBACK
    rogue = MqttTransport(MqttConfig(client_id="rogue", host="127.0.0.1", port=broker.port, protocol="5",
                                     username="plant1-lineA-st03", password="st03-pw", tls=tls))
    rec = AckRecorder()
    rogue.set_listener(rec)
    rogue.start()
    assert rec.up.wait(5)
    mid = rogue.publish(Message("lineguard/v1/plant1/lineA/st04/samples", encode(make_sample()), qos=1))
    wait_until(lambda: rec.acks, 5, "the PUBACK")
    assert rec.acks == [(mid, False, "Not authorized")]
    # nor its own station's model topic: only the hub says which model a station runs
    mid2 = rogue.publish(Message("lineguard/v1/plant1/lineA/st03/model", b"{}", qos=1))
    wait_until(lambda: len(rec.acks) == 2, 5, "the second PUBACK")
    assert rec.acks[1] == (mid2, False, "Not authorized")
    rogue.stop()
    # a wrong password is refused and logged; the client keeps retrying with backoff
    with caplog.at_level(logging.WARNING, logger="edge_agent.mqtt"):
        wrong = MqttTransport(MqttConfig(client_id="wrong", host="127.0.0.1", port=broker.port,
                                         username="plant1-lineA-st04", password="nope", tls=tls))
        wrong.start()
        wait_until(lambda: "refused the connection" in caplog.text, 5, "the refusal")
        assert not wrong.connected
        wrong.stop()
    assert len(hub.samples) == 5  # the rogue sample never reached the hub


@needs_tools
def test_deploy_mosquitto_conf_is_accepted(mosquitto_factory: Any, tmp_path: Path) -> None:  # skips w/o mosquitto
    """deploy/mosquitto/mosquitto.conf, with its paths pointed at temporary files, starts and listens."""
    pki = make_pki(tmp_path)
    (tmp_path / "passwd").touch()
    port = free_port()
    conf = (REPO / "deploy/mosquitto/mosquitto.conf").read_text()
    for old, new in {"/etc/mosquitto/certs/ca.crt": pki["ca.crt"], "/etc/mosquitto/certs/broker.crt": pki["broker.crt"],
                     "/etc/mosquitto/certs/broker.key": pki["broker.key"], "/etc/mosquitto/lineguard.passwd":
                     tmp_path / "passwd", "/etc/mosquitto/lineguard.acl": REPO / "deploy/mosquitto/acl",
                     "/var/lib/mosquitto/": f"{tmp_path}/", "listener 8883": f"listener {port} 127.0.0.1",
                     "log_dest syslog": f"log_dest stderr\nuser {pwd.getpwuid(os.geteuid()).pw_name}"}.items():
        assert old in conf, old
        conf = conf.replace(old, str(new))
    (tmp_path / "m.conf").write_text(conf)
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    proc = subprocess.Popen([mosquitto, "-c", str(tmp_path / "m.conf")], stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: proc.poll() is not None or _listening(port), 5, "the deploy broker")
        assert proc.poll() is None, proc.communicate()[1]
    finally:
        proc.kill()
        proc.wait()


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False
