"""Fixtures shared by every test directory: a real Mosquitto broker on a free port, and a
hub-side subscriber that decodes what it receives with the contract.

``mosquitto_broker`` starts Debian's ``mosquitto`` with a temporary config (one listener on
127.0.0.1, anonymous access, persistence into a temporary directory) and can SIGKILL and
restart it on the same port; the persistence file carries sessions and queued QoS 1 messages
over a restart, up to the last save (``autosave_interval 1``, or :meth:`MosquittoBroker.save`).
Without mosquitto, ``mosquitto_broker`` falls back to the hub's embedded broker (hub/broker.py, same
``.port``) and warns; ``mosquitto_factory`` and the mosquitto-only ``kill``/``restart``/``save`` skip
and say why. A system broker may be listening on 1883: the fixtures never use a fixed port.

``mqtt_collector(port, kinds=("samples",), client_id="hub-test", clean=False, username=None,
password=None)`` connects a paho subscriber (persistent session unless ``clean``, QoS 1,
resubscribing on every connect) to ``lineguard/v1/+/+/+/{kind}``; ``.samples`` lists the sample
ids received, duplicates included, ``.payloads`` the decoded samples, ``.messages`` the other
kinds as ``(kind, payload)``. Closed at teardown.
"""

from __future__ import annotations

import collections
import os
import pwd
import shutil
import signal
import socket
import subprocess
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

MOSQUITTO = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)


def sample_frames(start: int, stop: int, step: int) -> list[Any]:
    """Frames ``start:stop:step`` of the committed 1080p sample video (BGR arrays)."""
    import cv2

    cap = cv2.VideoCapture(str(Path(__file__).resolve().parents[1] / "sample_data" / "line_1080p.mp4"))
    out = []
    for i in range(start, stop, step):
        cap.set(cv2.CAP_PROP_POS_FRAMES, i)
        ok, f = cap.read()
        assert ok, f"sample video frame {i}"
        out.append(f)
    cap.release()
    return out


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MosquittoBroker:
    """One mosquitto process, restartable on the same port with the same persistence directory."""

    host = "127.0.0.1"

    def __init__(self, workdir: Path, port: int | None = None, extra_conf: str = "") -> None:
        if MOSQUITTO is None:
            raise RuntimeError("mosquitto is not installed")
        self.workdir = workdir
        self.port = port or free_port()
        self.extra_conf = extra_conf
        self.conf = workdir / "mosquitto.conf"
        self.log = workdir / "mosquitto.log"
        self.db = workdir / "mosquitto.db"
        self.proc: subprocess.Popen[bytes] | None = None

    def write_conf(self) -> None:
        user = pwd.getpwuid(os.geteuid()).pw_name  # as root, mosquitto would switch to "mosquitto"
        anonymous = "" if "allow_anonymous" in self.extra_conf else "allow_anonymous true\n"
        self.conf.write_text(
            f"listener {self.port} {self.host}\n"
            f"{self.extra_conf}\n"  # right after the listener: TLS options apply to it
            f"{anonymous}"
            "persistence true\n"
            f"persistence_location {self.workdir}/\n"
            "autosave_interval 1\n"
            "log_dest stderr\n"
            "log_type error\nlog_type warning\nlog_type notice\nlog_type information\n"
            f"user {user}\n"
        )

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 10.0) -> None:
        assert not self.running, "broker already running"
        self.write_conf()
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen([str(MOSQUITTO), "-c", str(self.conf)], stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"mosquitto did not listen on {self.port} within {timeout} s:\n{self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL: no goodbye, no final save; state since the last save is lost."""
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        """SIGTERM: mosquitto saves its state and exits."""
        if self.running:
            assert self.proc is not None
            self.proc.terminate()
            self.proc.wait(10)

    def restart(self, down_s: float = 0.0) -> None:
        self.kill()
        time.sleep(down_s)
        self.start()

    def save(self, timeout: float = 5.0) -> None:
        """Force a save of sessions and queued messages (SIGUSR1) and wait until it is on disk."""
        assert self.proc is not None and self.running
        before = self.db.stat().st_mtime_ns if self.db.exists() else 0
        self.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.db.exists() and self.db.stat().st_mtime_ns != before:
                return
            time.sleep(0.02)
        raise RuntimeError(f"mosquitto did not save within {timeout} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:]) if self.log.exists() else ""


@pytest.fixture
def mosquitto_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., MosquittoBroker]]:
    """``make(extra_conf="", start=True) -> MosquittoBroker``; every broker made is killed at teardown."""
    if MOSQUITTO is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto); broker tests need a real broker")
    made: list[MosquittoBroker] = []

    def make(extra_conf: str = "", start: bool = True) -> MosquittoBroker:
        broker = MosquittoBroker(tmp_path_factory.mktemp("mosquitto"), extra_conf=extra_conf)
        made.append(broker)
        if start:
            broker.start()
        return broker

    try:
        yield make
    finally:
        for broker in made:
            broker.kill()


class EmbeddedFallback:
    """What ``mosquitto_broker`` yields without mosquitto: the hub's embedded broker, same ``.port``."""

    host = "127.0.0.1"

    def __init__(self, broker: Any) -> None:
        self.broker = broker
        self.port: int = broker.port

    def _mosquitto_only(self, *args: Any, **kwargs: Any) -> None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto); the embedded broker fallback "
                    "cannot be killed and restarted with its state (no persistence)")

    kill = restart = save = _mosquitto_only


@pytest.fixture
def mosquitto_broker(request: pytest.FixtureRequest,
                     tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoBroker | EmbeddedFallback]:
    """A running Mosquitto on a free 127.0.0.1 port; killed at the end of the test. Without mosquitto,
    the hub's embedded broker, with a warning that says so."""
    if MOSQUITTO is not None:
        yield request.getfixturevalue("mosquitto_factory")()
        return
    from hub.broker import EmbeddedBroker

    warnings.warn("mosquitto is not installed: mosquitto_broker falls back to the hub's embedded broker "
                  "(hub/broker.py, rumqttd)", stacklevel=1)
    with EmbeddedBroker(port=free_port(), workdir=tmp_path_factory.mktemp("embedded-broker")) as broker:
        yield EmbeddedFallback(broker)


class MqttCollector:
    """The hub's side, written with paho directly: a persistent-session QoS 1 subscriber."""

    def __init__(self, port: int, kinds: tuple[str, ...] = ("samples",), client_id: str = "hub-test",
                 clean: bool = False, username: str | None = None, password: str | None = None) -> None:
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        self.samples: list[str] = []
        self.payloads: dict[str, Any] = {}
        self.messages: list[tuple[str, Any]] = []  # (kind, payload) of everything but samples
        self.subscribed = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean)
        self.client.reconnect_delay_set(1, 1)
        if username is not None:
            self.client.username_pw_set(username, password)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe([(f"lineguard/v1/+/+/+/{k}", 1) for k in kinds])
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self.subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect_async("127.0.0.1", port, 5)
        self.client.loop_start()
        assert self.subscribed.wait(10), "collector could not subscribe"

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        from lineguard_contract import SamplePayload, decode

        kind = msg.topic.rsplit("/", 1)[1]
        payload = decode(kind, msg.payload)
        if isinstance(payload, SamplePayload):
            self.samples.append(payload.sample_id)
            self.payloads[payload.sample_id] = payload
        else:
            self.messages.append((kind, payload))

    def wait_for(self, ids: set[str], timeout: float) -> None:
        """Wait until every id in ``ids`` has been received; AssertionError naming how many are missing."""
        deadline = time.monotonic() + timeout
        while not ids <= set(self.samples):
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(ids - set(self.samples))} of {len(ids)} samples missing after {timeout} s")
            time.sleep(0.02)

    def duplicates(self) -> int:
        return sum(n - 1 for n in collections.Counter(self.samples).values())

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def mqtt_collector() -> Iterator[Callable[..., MqttCollector]]:
    """``make(port, kinds=("samples",), ...) -> MqttCollector``; all are closed at teardown."""
    pytest.importorskip("paho.mqtt")
    made: list[MqttCollector] = []

    def make(port: int, **kwargs: Any) -> MqttCollector:
        made.append(MqttCollector(port, **kwargs))
        return made[-1]

    try:
        yield make
    finally:
        for c in made:
            c.close()
