"""The whole agent, end to end: video -> INT8 model -> samples over a real Mosquitto, /metrics,
and the `lineguard-agent run` command line (config errors, a clean stop on SIGTERM)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from edge_agent.agent import Agent
from edge_agent.config import build_config

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "sample_data" / "line_1080p.mp4"
BUNDLE = REPO / "models" / "default"


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cfg(tmp_path: Path, port: int, **over: Any) -> Any:
    data: dict[str, Any] = {
        "identity": {"site": "s1", "line": "l1", "station": "st1"},
        "cameras": [{"id": "cam1", "source": str(SAMPLE), "realtime": False}],
        "model": {"bundle": str(BUNDLE)},
        "mqtt": {"url": f"mqtt://127.0.0.1:{port}", "heartbeat_s": 0.5},
        "outbox": {"path": str(tmp_path / "outbox.sqlite3")},
        "sampling": {"negative_rate": 0.0, "max_per_minute": 10000},
        "metrics": {"port": free_tcp_port()},
    }
    for key, value in over.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return build_config(data)


def _run_until_done(agent: Agent, timeout: float = 120) -> None:
    agent.start()
    deadline = time.monotonic() + timeout
    while not agent.finished():
        assert time.monotonic() < deadline, "the agent did not finish the video in time"
        time.sleep(0.2)


def test_agent_delivers_every_sample_and_serves_metrics(tmp_path: Path, mosquitto_broker: Any,
                                                        mqtt_collector: Any) -> None:
    hub = mqtt_collector(mosquitto_broker.port, kinds=("samples", "status", "heartbeat"))
    cfg = _cfg(tmp_path, mosquitto_broker.port)
    agent = Agent(cfg)
    _run_until_done(agent)
    time.sleep(1.2)  # at least one heartbeat
    body = urllib.request.urlopen(f"http://127.0.0.1:{cfg.metrics.port}/metrics", timeout=5).read().decode()
    stored = agent.samples_stored
    assert agent.uplink is not None and agent.uplink.wait_drained(30)
    agent.stop()
    assert stored > 0, "the sample video has defects: some frames must be sampled"
    hub_ids = set(hub.samples)
    assert len(hub_ids) == stored and hub.duplicates() == 0
    sample = next(iter(hub.payloads.values()))
    assert (sample.site, sample.line, sample.station, sample.camera) == ("s1", "l1", "st1", "cam1")
    assert sample.image[:2] == b"\xff\xd8" and sample.width == 1920 and sample.height == 1080
    assert sample.model_version == agent.detector.version and sample.reason in ("defect", "uncertain")
    kinds = {k for k, _ in hub.messages}
    assert {"status", "heartbeat"} <= kinds
    assert {p.mode for k, p in hub.messages if k == "heartbeat"} == {"full"}  # the hub's view of split use
    for name in ("lineguard_frames_in_total", "lineguard_frames_dropped_total", "lineguard_frame_latency_seconds",
                 "lineguard_batch_size", "lineguard_queue_depth", "lineguard_outbox_depth",
                 "lineguard_mqtt_bytes_sent", "lineguard_fps"):
        assert name in body, f"{name} missing from /metrics"
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in body.splitlines()
              if line.startswith("lineguard_frames_")}
    captured = values['lineguard_frames_in_total{camera="cam1"}']
    processed = values['lineguard_frames_processed_total{camera="cam1"}']
    dropped = values['lineguard_frames_dropped_total{camera="cam1"}']
    assert captured == 300 and processed > 0 and processed + dropped == captured


def test_samples_wait_in_the_outbox_while_the_broker_is_down(tmp_path: Path, mosquitto_factory: Any,
                                                             mqtt_collector: Any) -> None:
    broker = mosquitto_factory()
    hub = mqtt_collector(broker.port)  # the hub's persistent session exists before the outage
    broker.save()
    broker.kill()
    agent = Agent(_cfg(tmp_path, broker.port, metrics={"port": 0}))
    _run_until_done(agent)
    deadline = time.monotonic() + 30
    while agent._samples.qsize():
        assert time.monotonic() < deadline
        time.sleep(0.1)
    time.sleep(0.5)
    stored = agent.samples_stored
    assert stored > 0 and agent.outbox.depth == stored, "with the broker down every sample waits on disk"
    broker.start()
    assert agent.uplink is not None and agent.uplink.wait_drained(60)
    agent.stop()
    deadline = time.monotonic() + 15
    while len(set(hub.samples)) < stored and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(set(hub.samples)) == stored


def _agent_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "edge_agent.cli", *args], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **(env or {})})


@pytest.mark.parametrize(
    ("yaml_text", "error"),
    [("cameras: [{id: c1, source: x.mp4}]\nmqtt: {urll: 'mqtt://h:1'}\n", "mqtt.urll: unknown key"),
     ("cameras: [{id: c1, source: x.mp4}]\nbatching: {max_batch: 0}\n", "batching.max_batch"),
     ("cameras: []\n", "cameras")],
)
def test_cli_rejects_bad_config_naming_the_key(tmp_path: Path, yaml_text: str, error: str) -> None:
    f = tmp_path / "station.yaml"
    f.write_text(yaml_text)
    proc = _agent_cli("run", "-c", str(f))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and error in err and str(f) in err


def test_cli_unreadable_video_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(2000))
    proc = _agent_cli("run", "--source", str(bad), "--broker", "mqtt://127.0.0.1:1", "--outbox",
                      str(tmp_path / "o.sqlite3"), "--metrics-port", "0")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "broken.mp4" in err


def test_cli_runs_and_stops_cleanly_on_sigterm(tmp_path: Path, mosquitto_broker: Any, mqtt_collector: Any) -> None:
    hub = mqtt_collector(mosquitto_broker.port, kinds=("samples", "status"))
    proc = _agent_cli("run", "--source", str(SAMPLE), "--loop", "--broker", f"mqtt://127.0.0.1:{mosquitto_broker.port}",
                      "--station", "s1/l1/st9", "--outbox", str(tmp_path / "o.sqlite3"), "--metrics-port", "0")
    deadline = time.monotonic() + 60
    while not any(k == "status" and p.state == "online" for k, p in hub.messages):
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "agent never came online"
        time.sleep(0.1)
    time.sleep(2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert re.search(r"agent stopped: \d+ samples stored, 0 left in the outbox", err), err
    statuses = [p.state for k, p in hub.messages if k == "status"]
    assert statuses[-1] == "offline"  # a clean stop publishes offline (the will covers a crash)
