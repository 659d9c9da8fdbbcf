"""Over-the-air updates end to end: the hub announces a registered, signed version (retained, real
broker), the agent fetches it over HTTP from the hub's API (resumable), verifies and installs it,
and swaps its detector between batches. Tampered files, a wrong key, an unsigned bundle and a
downgrade are refused, logged and counted, and the old model keeps running."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_agent.bundle_store import BundleStore
from edge_agent.detector import OnnxDetector
from edge_agent.mqtt import MqttConfig, MqttTransport
from edge_agent.ota import BundleFetcher, ModelUpdater
from edge_agent.swap import SwappableDetector
from hub.accounts import create_token
from hub.core.config import HubMqttConfig
from hub.mqtt import RetainedPublisher
from hub.registry import register
from hub.rollout import RolloutError, announce, bundle_base_url
from lineguard_contract import ModelAnnouncePayload, StationId, Topics, encode
from models.bundle import read_manifest
from models.signing import generate_keypair, load_public_keys, rebadge_bundle
from tests.hub.conftest import hub_app, live_app

ROOT = Path(__file__).resolve().parents[2]
STATION = StationId("plant1", "lineA", "st03")
PASSWORD = "correct horse battery"


def make_version(src: Path, out: Path, version: str, key: Path | None) -> Path:
    """A bundle ``version`` with the INT8 model of ``src`` (its metadata rewritten), signed with ``key``."""
    return rebadge_bundle(src, out, version, key)


@dataclass
class Fleet:
    url: str
    token: str
    sessions: Any
    bundles: dict[str, Path]
    keys: tuple[Path, Path]
    other_key: Path
    tmp: Path

    def announcement(self, version: str, pinned: bool = False) -> ModelAnnouncePayload:
        with self.sessions() as s:
            return announce(s, lambda t, d: None, version, [STATION], public_url=self.url, stage="canary",
                            pinned=pinned)

    def agent(self, name: str = "agent") -> tuple[BundleStore, ModelUpdater, SwappableDetector]:
        store = BundleStore(self.tmp / name, public_keys=load_public_keys([self.keys[1]]))
        store.install(self.bundles["1.0.0"])
        sw = SwappableDetector(OnnxDetector(store.current(), workers=1))
        sw.load()

        def activate(bundle: Any) -> None:
            sw.swap(OnnxDetector(bundle, workers=1))

        return store, ModelUpdater(store, BundleFetcher(token=self.token), activate), sw


@pytest.fixture
def fleet(hub_store: Any, tmp_path: Path) -> Iterator[Fleet]:
    priv, pub = generate_keypair(tmp_path / "keys")
    other, _ = generate_keypair(tmp_path / "other", name="someone-else")
    base = ROOT / "models" / "default"
    bundles = {v: make_version(base, tmp_path / "hub-bundles" / v, v, priv) for v in ("1.0.0", "2.0.0", "2.1.0")}
    bundles["3.0.0"] = make_version(base, tmp_path / "hub-bundles" / "3.0.0", "3.0.0", other)  # the wrong key
    bundles["3.1.0"] = make_version(base, tmp_path / "hub-bundles" / "3.1.0", "3.1.0", None)  # unsigned
    hub_store.add_users(PASSWORD, agents="viewer")
    with hub_store.sessions.begin() as s:
        register(s, bundles["1.0.0"], actor="test", status="production")
        for v in ("2.0.0", "2.1.0", "3.0.0", "3.1.0"):
            register(s, bundles[v], actor="test")
        token = create_token(s, "agents", "fleet")
    with live_app(hub_app(hub_store.config, hub_store.sessions.kw["bind"], hub_store.blobs)) as url:
        yield Fleet(url, token, hub_store.sessions, bundles, (priv, pub), other, tmp_path)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_announce_fetch_verify_install_swap_over_a_real_broker(fleet: Fleet, mosquitto_broker: Any) -> None:
    store, updater, sw = fleet.agent()
    updater.start()
    agent_mqtt = MqttTransport(MqttConfig(client_id="agent-st03", port=mosquitto_broker.port))
    agent_mqtt.subscribe(Topics().station(STATION, "model"), lambda topic, payload: updater.handle(payload))
    agent_mqtt.start()
    try:
        with fleet.sessions() as s, RetainedPublisher(HubMqttConfig(url=f"mqtt://127.0.0.1:{mosquitto_broker.port}"),
                                                      "hub-rollout") as pub:
            sent = announce(s, pub.publish, "2.0.0", [STATION], public_url=fleet.url, stage="canary")
        assert sent.base_url == bundle_base_url(fleet.url, "2.0.0")
        deadline = time.monotonic() + 30
        while updater.counters["updated"] < 1:  # counted just after the swap
            assert time.monotonic() < deadline, (updater.counters, updater.last_error)
            time.sleep(0.05)
        assert store.current_version() == "2.0.0" and store._target("previous").name == "1.0.0"  # type: ignore[union-attr]
        assert len(sw.detect([np.zeros((720, 1280, 3), np.uint8)])) == 1
        assert sw.version == "2.0.0" and updater.counters["updated"] == 1
        assert not (store.root / "downloads" / "2.0.0").exists()
        assert not (store.root / "versions" / "2.0.0" / "model_fp32.onnx").exists()  # only what it runs
    finally:
        updater.stop()
        agent_mqtt.stop()
    # retained: an agent that connects later gets the same announcement
    store2, updater2, sw2 = fleet.agent("late")
    late = MqttTransport(MqttConfig(client_id="agent-late", port=mosquitto_broker.port))
    late.subscribe(Topics().station(STATION, "model"), lambda topic, payload: updater2.handle(payload))
    updater2.start()
    late.start()
    try:
        deadline = time.monotonic() + 30
        while sw2.version != "2.0.0":
            assert time.monotonic() < deadline, (updater2.counters, updater2.last_error)
            time.sleep(0.05)
    finally:
        updater2.stop()
        late.stop()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_an_interrupted_download_resumes(fleet: Fleet) -> None:
    store, updater, sw = fleet.agent()
    entry = read_manifest(fleet.bundles["2.0.0"]).files["onnx_int8"]
    part = store.root / "downloads" / "2.0.0" / f"{entry.path}.part"
    part.parent.mkdir(parents=True)
    full = (fleet.bundles["2.0.0"] / entry.path).read_bytes()
    part.write_bytes(full[: len(full) // 3])  # what a dropped connection left
    assert updater.apply(fleet.announcement("2.0.0"))
    assert updater.fetcher.resumed == 1 and sw.version == "2.0.0"
    assert updater.fetcher.bytes_downloaded < len(full)  # the first third was not fetched again


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize(("version", "tamper", "counter", "reason"), [
    ("2.1.0", "file", "download", "is not the manifest's"),
    ("2.1.0", "manifest", "download", "is not the announced"),
    ("3.0.0", None, "verify", "signature"),
    ("3.1.0", None, "verify", "unsigned"),
])
def test_bad_bundles_are_refused_and_the_old_model_keeps_running(fleet: Fleet, version: str, tamper: str | None,
                                                                 counter: str, reason: str,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    store, updater, sw = fleet.agent()
    ann = fleet.announcement(version)
    if tamper == "file":
        p = fleet.bundles[version] / "model_int8.onnx"
        data = bytearray(p.read_bytes())
        data[len(data) // 2] ^= 0xFF
        p.write_bytes(bytes(data))
    elif tamper == "manifest":
        p = fleet.bundles[version] / "manifest.json"
        p.write_text(p.read_text().replace('"name"', '"name" ', 1))
    with caplog.at_level("ERROR", logger="edge_agent.ota"):
        assert not updater.apply(ann)
    assert updater.counters[counter] == 1 and reason in (updater.last_error or ""), updater.last_error
    assert reason in caplog.text
    assert sw.version == "1.0.0" and store.current_version() == "1.0.0"
    assert len(sw.detect([np.zeros((720, 1280, 3), np.uint8)])) == 1


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_downgrade_needs_a_pin(fleet: Fleet) -> None:
    store, updater, sw = fleet.agent()
    assert updater.apply(fleet.announcement("2.1.0")) and sw.version == "2.1.0"
    assert not updater.apply(fleet.announcement("2.0.0"))
    assert updater.counters["downgrade"] == 1 and "pinned by an admin" in (updater.last_error or "")
    assert sw.version == "2.1.0"
    assert updater.apply(fleet.announcement("2.0.0", pinned=True))  # an admin's rollback
    assert sw.version == "2.0.0" and store.current_version() == "2.0.0"


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_hub_serves_only_registered_bundle_files_to_signed_in_clients(fleet: Fleet) -> None:
    import urllib.error
    import urllib.request

    def status(path: str, token: str | None = fleet.token) -> int:
        req = urllib.request.Request(fleet.url + path, headers={"Authorization": f"Bearer {token}"} if token else {})
        try:
            with urllib.request.urlopen(req) as r:  # noqa: S310 (the test's own server)
                return int(r.status)
        except urllib.error.HTTPError as e:
            return e.code

    assert status("/api/v1/bundles/2.0.0/manifest.json") == 200
    assert status("/api/v1/bundles/2.0.0/manifest.json", token=None) == 401
    assert status("/api/v1/bundles/2.0.0/state.json") == 404
    assert status("/api/v1/bundles/9.9.9/manifest.json") == 404
    with fleet.sessions.begin() as s:
        from hub.registry import set_status

        set_status(s, "2.1.0", "rejected", actor="test", reason="bad")
    assert status("/api/v1/bundles/2.1.0/manifest.json") == 404
    with fleet.sessions() as s, pytest.raises(RolloutError, match="rejected"):
        announce(s, lambda t, d: None, "2.1.0", [STATION], public_url=fleet.url, stage="canary")


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_running_agent_updates_without_dropping_frames_and_restarts_on_the_new_version(
        fleet: Fleet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edge_agent.agent import Agent
    from edge_agent.config import build_config
    from edge_agent.transport import MemoryTransport
    from lineguard_contract import encode

    monkeypatch.setenv("LINEGUARD_AGENT_TOKEN", fleet.token)
    cfg = build_config({
        "identity": {"site": STATION.site, "line": STATION.line, "station": STATION.station},
        "cameras": [{"id": "c", "source": str(ROOT / "sample_data" / "line_1080p.mp4"), "loop": True}],
        "model": {"bundle": str(fleet.bundles["1.0.0"]), "store": str(tmp_path / "store"),
                  "public_keys": [str(fleet.keys[1])]},
        "outbox": {"path": str(tmp_path / "o.db")}})
    transport = MemoryTransport()
    agent = Agent(cfg, transport=transport)
    agent.start()
    try:
        assert agent.detector.version == "1.0.0"
        deadline = time.monotonic() + 20
        while agent.batcher is None or agent.batcher.stats().frames < 5:
            assert time.monotonic() < deadline, "no frames before the update"
            time.sleep(0.05)
        transport.deliver(Topics().station(STATION, "model"), encode(fleet.announcement("2.0.0")))
        deadline = time.monotonic() + 30
        while agent.detector.version != "2.0.0":
            assert time.monotonic() < deadline, (agent.updater.counters, agent.updater.last_error)
            time.sleep(0.05)
        before = agent.batcher.stats().frames
        while agent.batcher.stats().frames < before + 5:
            assert time.monotonic() < deadline + 20, "no frames after the update"
            time.sleep(0.05)
        st = agent.batcher.stats()
        assert st.detector_errors == 0 and st.frames_failed == 0  # no batch failed, no frame lost to the swap
        assert agent.health().model_version == "2.0.0" and agent.uplink.model_version == "2.0.0"  # type: ignore[union-attr]
        from prometheus_client import generate_latest

        text = generate_latest(agent.metrics.registry).decode()
        assert 'lineguard_model_updates{counter="updated"} 1.0' in text, text
    finally:
        agent.stop(drain_s=0)
    again = Agent(cfg, transport=MemoryTransport())  # after a restart: the store's current version
    assert again.detector.version == "2.0.0"


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_failed_download_is_retried_with_backoff(fleet: Fleet) -> None:
    store, updater, sw = fleet.agent()
    updater.retry_s = (0.2, 0.4)
    model = fleet.bundles["2.0.0"] / "model_int8.onnx"
    hidden = model.with_name("away.onnx")
    model.rename(hidden)  # the hub cannot serve it for a moment
    updater.start()
    try:
        updater.handle(encode(fleet.announcement("2.0.0")))
        deadline = time.monotonic() + 10
        while updater.counters["download"] < 2:
            assert time.monotonic() < deadline, updater.counters
            time.sleep(0.02)
        assert sw.version == "1.0.0" and "HTTP 404" in (updater.last_error or "")
        hidden.rename(model)
        while updater.counters["updated"] < 1:  # counted just after the swap
            assert time.monotonic() < deadline, (updater.counters, updater.last_error)
            time.sleep(0.02)
        assert updater.counters["retries"] >= 2 and updater.counters["updated"] == 1 and sw.version == "2.0.0"
    finally:
        updater.stop()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_split_agent_refuses_a_bundle_without_split_parts_for_good(fleet: Fleet) -> None:
    """A bundle without the edge part a split agent runs is refused like a bad bundle (``verify``),
    not retried as a failed download; the old model keeps running."""
    store, updater, sw = fleet.agent()
    updater.roles = ("split_edge_int8", "onnx_int8")  # what a split agent in mode auto fetches
    updater.retry_s = (0.05,)
    updater.start()
    try:
        updater.handle(encode(fleet.announcement("2.0.0")))  # fleet bundles carry the INT8 model only
        deadline = time.monotonic() + 10
        while updater.counters["verify"] < 1:
            assert time.monotonic() < deadline, updater.counters
            time.sleep(0.02)
        time.sleep(0.5)  # a download failure would have been retried several times by now
        assert updater.counters["retries"] == 0 and updater.counters["download"] == 0, updater.counters
        assert "has no split_edge_int8 file" in (updater.last_error or "")
        assert sw.version == "1.0.0" and store.current_version() == "1.0.0"
    finally:
        updater.stop()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_split_agent_fetches_and_installs_only_its_edge_part(fleet: Fleet) -> None:
    """An agent in split mode (``split.mode: split``) downloads the edge part alone, not the full
    model it never runs, and its store installs that (it refused every update before: the store
    asked for the full model's file)."""
    roles = ("onnx_int8", "split_edge_int8", "split_hub")
    base = ROOT / "models" / "default"
    for v in ("2.2.0", "2.3.0"):
        fleet.bundles[v] = rebadge_bundle(base, fleet.tmp / "hub-bundles" / v, v, fleet.keys[0], roles=roles)
        with fleet.sessions.begin() as s:
            register(s, fleet.bundles[v], actor="test")
    store = BundleStore(fleet.tmp / "split-agent", public_keys=load_public_keys([fleet.keys[1]]),
                        roles=("split_edge_int8",))
    store.install(fleet.bundles["2.2.0"])
    activated: list[str] = []
    updater = ModelUpdater(store, BundleFetcher(token=fleet.token), lambda b: activated.append(b.manifest.version),
                           roles=("split_edge_int8",))
    updater.start()
    try:
        updater.handle(encode(fleet.announcement("2.3.0")))
        deadline = time.monotonic() + 20
        while updater.counters["updated"] < 1:
            assert time.monotonic() < deadline, (updater.counters, updater.last_error)
            time.sleep(0.02)
        assert activated == ["2.3.0"] and store.current_version() == "2.3.0"
        kept = {p.name for p in (store.root / "versions" / "2.3.0").iterdir()}
        assert "split_edge_int8.onnx" in kept and "model_int8.onnx" not in kept, kept
    finally:
        updater.stop()
