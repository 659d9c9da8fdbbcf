"""The head service: exact decoding with the right head, refusals, dead letters, batching, and the
MQTT worker against a real broker. Uses the shipped bundle's split parts (models/default)."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from hub.core.config import build_config
from hub.head_service import HeadService
from hub.heads import Head, bundles_dir_loader, load_heads
from hub.server import start_heads
from lineguard_contract import ModelAnnouncePayload, StationId, Topics, encode
from lineguard_contract.features import FeatureHeader, decode_split_result, encode_features
from models.bundle import load_bundle
from models.detections import Detections
from models.feature_codec import FeatureSpec, encode_codes
from models.processing import postprocess, preprocess_batch
from models.signing import rebadge_bundle
from models.split_runtime import SplitEdgeRunner, SplitHubRunner
from tests.conftest import free_port, sample_frames

BUNDLE = Path(__file__).resolve().parents[2] / "models" / "default"
TOPICS = Topics()
STATION = StationId("plant1", "lineA", "st03")
FEATURES = TOPICS.station(STATION, "features")
RESULTS = TOPICS.station(STATION, "split_results")


@pytest.fixture(scope="module")
def bundle() -> Any:
    return load_bundle(BUNDLE, roles=("split_edge_int8", "split_hub"))


@pytest.fixture(scope="module")
def frames() -> list[np.ndarray]:
    return sample_frames(0, 240, 30)


@pytest.fixture(scope="module")
def edge(bundle: Any) -> SplitEdgeRunner:
    return SplitEdgeRunner(bundle.path("split_edge_int8"), version=bundle.manifest.version)


def header(spec: FeatureSpec, version: str, rid: str, **kw: Any) -> FeatureHeader:
    fields = dict(request_id=rid, agent_id="agent-st03", camera="cam0", ts=time.time(), bundle_version=version,
                  cut=spec.cut, channels=spec.channels, height=spec.height, width=spec.width, bits=spec.bits,
                  codec=spec.codec, deadline_ms=5000.0)
    return FeatureHeader(**{**fields, **kw})


class Published:
    def __init__(self) -> None:
        self.items: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()

    def __call__(self, topic: str, data: bytes) -> None:
        with self.lock:
            self.items.append((topic, data))

    def wait(self, n: int, timeout: float = 20.0) -> list[Any]:
        deadline = time.monotonic() + timeout
        while len(self.items) < n:
            assert time.monotonic() < deadline, f"{len(self.items)} of {n} results"
            time.sleep(0.01)
        return [decode_split_result(d) for _, d in self.items]


@pytest.fixture
def service(bundle: Any, tmp_path: Path) -> Iterator[Callable[..., tuple[HeadService, Published]]]:
    made: list[HeadService] = []

    def make(**kw: Any) -> tuple[HeadService, Published]:
        pub = Published()
        svc = HeadService(load_heads([BUNDLE], threads=2), pub, dead_letter_dir=tmp_path / "dead", **kw)
        svc.start()
        made.append(svc)
        return svc, pub

    yield make
    for s in made:
        s.stop()


def test_answers_equal_the_hub_part_run_directly(service: Any, edge: SplitEdgeRunner, bundle: Any,
                                                 frames: list[np.ndarray]) -> None:
    svc, pub = service(max_batch=4, max_delay_ms=50)
    batch, _ = preprocess_batch(frames, tuple(bundle.manifest.input_size))
    codes = edge.run(batch)
    for i, c in enumerate(codes):
        svc.submit(FEATURES, encode_features(header(edge.spec, bundle.manifest.version, f"r-{i}"),
                                             encode_codes(c, edge.spec)))
    results = {r.request_id: r for r in pub.wait(len(frames))}
    assert all(topic == RESULTS for topic, _ in pub.items)
    hub = SplitHubRunner(bundle.path("split_hub"), edge.spec)
    post = bundle.manifest.postprocessing
    want = postprocess(hub.run(codes), [None] * len(frames), conf=post.operating_conf, iou=post.iou)
    found = 0
    for i, d in enumerate(want):
        r = results[f"r-{i}"]
        assert r.status == "ok" and r.bundle_version == bundle.manifest.version
        got = np.array([x.box for x in r.detections], np.float32).reshape(-1, 4)
        assert len(got) == len(d)
        np.testing.assert_allclose(got, d.boxes, atol=1e-3)  # boxes in model-input pixels
        found += len(d)
    assert found > 0, "the sample frames should hold some detections"
    stats = svc.stats()
    assert stats["answered"] == len(frames) and max(stats["batch_sizes"]) > 1, stats


def test_a_version_not_deployed_is_loaded_from_the_bundles_dir_once(service: Any, edge: SplitEdgeRunner,
                                                                     bundle: Any, frames: list[np.ndarray],
                                                                     tmp_path: Path) -> None:
    """A split agent that took an update asks for 1.3.0: its head is loaded on the first frame and
    kept; a version that is not there, a directory whose manifest says another version, and a
    path are refused, each looked for once (then remembered as missing)."""
    bdir = tmp_path / "bundles"
    rebadge_bundle(BUNDLE, bdir / "1.3.0", "1.3.0", None, roles=("split_edge_int8", "split_hub"))
    shutil.copytree(BUNDLE, bdir / "1.4.0")  # its manifest says 1.2.0
    asked: list[str] = []
    load = bundles_dir_loader(bdir, 2)

    def loader(version: str) -> Any:
        asked.append(version)
        return load(version)

    svc, pub = service(loader=loader, max_delay_ms=50)
    batch, _ = preprocess_batch(frames[:2], tuple(bundle.manifest.input_size))
    codes = edge.run(batch)
    versions = ["1.3.0", "1.3.0", "2.0.0", "2.0.0", "1.4.0", "../bundles/1.3.0", bundle.manifest.version]
    for i, v in enumerate(versions):
        svc.submit(FEATURES, encode_features(header(edge.spec, v, f"r-{i}"), encode_codes(codes[i % 2], edge.spec)))
    results = {r.request_id: r for r in pub.wait(len(versions))}
    status = [results[f"r-{i}"].status for i in range(len(versions))]
    reasons = [r.reason for r in results.values()]
    assert status == ["ok", "ok", "refused", "refused", "refused", "refused", "ok"], reasons
    assert results["r-0"].bundle_version == "1.3.0"
    # the same files as the deployed 1.2.0: the same boxes for the same codes
    assert [d.box for d in results["r-0"].detections] == [d.box for d in results["r-6"].detections]
    assert asked == ["1.3.0", "2.0.0", "1.4.0", "../bundles/1.3.0"]  # never for a deployed or loaded version
    stats = svc.stats()
    assert stats["heads_loaded"] == 1 and stats["heads_not_found"] == 3 and stats["refused_version"] == 4, stats


def test_a_head_loading_holds_up_only_its_own_version(service: Any, edge: SplitEdgeRunner, bundle: Any,
                                                     frames: list[np.ndarray], tmp_path: Path) -> None:
    """While 1.3.0's head loads (1.5 s here), frames of the deployed version are answered at once;
    1.3.0's frames wait for the load and are answered after it, one load for all of them."""
    bdir = tmp_path / "bundles"
    rebadge_bundle(BUNDLE, bdir / "1.3.0", "1.3.0", None, roles=("split_edge_int8", "split_hub"))
    load = bundles_dir_loader(bdir, 2)
    loads: list[str] = []

    def slow(version: str) -> Any:
        loads.append(version)
        time.sleep(1.5)
        return load(version)

    svc, pub = service(loader=slow, max_delay_ms=2)
    batch, _ = preprocess_batch(frames[:1], tuple(bundle.manifest.input_size))
    msg = encode_codes(edge.run(batch)[0], edge.spec)
    t0 = time.monotonic()
    for i in range(3):
        svc.submit(FEATURES, encode_features(header(edge.spec, "1.3.0", f"new-{i}"), msg))
    for i in range(3):
        svc.submit(FEATURES, encode_features(header(edge.spec, bundle.manifest.version, f"old-{i}"), msg))
    old = pub.wait(3)
    assert time.monotonic() - t0 < 1.0 and {r.request_id for r in old} == {"old-0", "old-1", "old-2"}, old
    results = pub.wait(6)
    assert [r.status for r in results[3:]] == ["ok"] * 3 and {r.bundle_version for r in results[3:]} == {"1.3.0"}
    stats = svc.stats()
    assert loads == ["1.3.0"] and stats["heads_loaded"] == 1 and stats["received"] == 6, stats
    assert stats["answered"] == 6 and stats.get("expired", 0) == 0, stats


class SleepyRunner:
    """A head runtime that takes ``ms`` per frame and finds nothing: timing without a model."""

    provider = "sleepy"

    def __init__(self, ms: float) -> None:
        self.ms = ms

    def detect(self, codes: np.ndarray, **kw: Any) -> list[Detections]:
        time.sleep(self.ms / 1000 * len(codes))
        return [Detections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int32))
                for _ in codes]


def test_urgent_frames_go_first_and_batches_fit_the_shortest_deadline(edge: SplitEdgeRunner) -> None:
    """12 warm-up frames (15 s deadline, as an agent sends before it swaps) queued before 3 live
    frames (400 ms): the live ones are answered first, and no batch is longer than half the live
    deadline at the head's 40 ms a frame (5 frames), so a frame arriving meanwhile is not held
    up by a batch of warm-ups (FIFO in one batch of 15 took 600 ms)."""
    head = Head("1.0.0", edge.spec, SleepyRunner(40), 0.25, 0.45, 300, (544, 960))
    head.warm()
    pub = Published()
    svc = HeadService({"1.0.0": head}, pub, max_batch=32, max_delay_ms=5)
    codes = encode_codes(np.zeros(edge.spec.shape, np.uint8), edge.spec)
    for i in range(12):
        svc.submit(FEATURES, encode_features(header(edge.spec, "1.0.0", f"warm-{i}", deadline_ms=15000.0), codes))
    for i in range(3):
        svc.submit(FEATURES, encode_features(header(edge.spec, "1.0.0", f"live-{i}", deadline_ms=400.0), codes))
    svc.start()
    try:
        results = pub.wait(15)
    finally:
        svc.stop()
    assert [r.request_id for r in results[:3]] == ["live-0", "live-1", "live-2"], [r.request_id for r in results]
    assert all(r.status == "ok" for r in results)
    stats = svc.stats()
    assert stats["answered"] == 15 and max(stats["batch_sizes"]) <= 5, stats
    assert stats["batch_ms_max"] < 400, stats


def test_slow_answers_are_counted_and_their_time_is_broken_down(edge: SplitEdgeRunner,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """6 frames at once, 40 ms a frame, 200 ms deadlines: batches of 2 (100 ms); the last batch's
    frames wait for the first two and spend more than 100 ms here: counted, and the log says
    where the time went."""
    head = Head("1.0.0", edge.spec, SleepyRunner(40), 0.25, 0.45, 300, (544, 960))
    head.warm()
    pub = Published()
    svc = HeadService({"1.0.0": head}, pub, max_batch=32, max_delay_ms=20)
    codes = encode_codes(np.zeros(edge.spec.shape, np.uint8), edge.spec)
    svc.start()
    try:
        with caplog.at_level("WARNING", logger="hub.head_service"):
            for i in range(6):
                svc.submit(FEATURES, encode_features(header(edge.spec, "1.0.0", f"f-{i}", deadline_ms=200.0), codes))
            pub.wait(6)
    finally:
        svc.stop()
    stats = svc.stats()
    assert stats["answered"] == 6 and max(stats["batch_sizes"]) == 2 and stats["slow_answers"] >= 2, stats
    (line,) = [r.getMessage() for r in caplog.records if "slower than 100 ms" in r.getMessage()]
    assert "queued before the worker took it" in line and "waiting for its batch" in line, line


def test_an_announced_version_is_loaded_before_any_frame_asks(mosquitto_broker: Any, edge: SplitEdgeRunner,
                                                              bundle: Any, frames: list[np.ndarray],
                                                              tmp_path: Path) -> None:
    """The head service hears the rollout's retained announcement and loads 1.3.0's head at once;
    the first 1.3.0 frame is then answered without a load. A malformed announcement is logged and
    changes nothing."""
    bdir = tmp_path / "bundles"
    rebadge_bundle(BUNDLE, bdir / "1.3.0", "1.3.0", None, roles=("split_edge_int8", "split_hub"))
    cfg = build_config({"data_dir": str(tmp_path), "mqtt": {"url": f"mqtt://127.0.0.1:{mosquitto_broker.port}"},
                        "heads": {"bundles": [str(BUNDLE)], "bundles_dir": str(bdir), "threads": 2}})
    hub = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"hub-{free_port()}")
    hub.connect("127.0.0.1", mosquitto_broker.port)
    hub.loop_start()
    worker = None
    try:
        hub.publish(TOPICS.station(StationId("plant1", "lineA", "st09"), "model"), b"{not json", qos=1,
                    retain=True).wait_for_publish(5)
        announce = ModelAnnouncePayload(version="1.3.0", manifest_sha256="0" * 64, base_url="http://hub:8000/b/",
                                        stage="canary", ts=time.time())
        hub.publish(TOPICS.station(STATION, "model"), encode(announce), qos=1, retain=True).wait_for_publish(5)
        worker = start_heads(cfg, client_id="heads-preload")
        deadline = time.monotonic() + 20
        while worker.service.stats().get("heads_loaded", 0) < 1:
            assert time.monotonic() < deadline, worker.service.stats()
            time.sleep(0.02)
        assert "1.3.0" in worker.service.heads
        batch, _ = preprocess_batch(frames[:1], tuple(bundle.manifest.input_size))
        worker.service.submit(FEATURES, encode_features(header(edge.spec, "1.3.0", "after"),
                                                        encode_codes(edge.run(batch)[0], edge.spec)))
        deadline = time.monotonic() + 20
        while worker.service.stats().get("answered", 0) < 1:
            assert time.monotonic() < deadline, worker.service.stats()
            time.sleep(0.02)
        stats = worker.service.stats()
        assert stats["heads_loaded"] == 1 and stats.get("heads_not_found", 0) == 0, stats
        assert stats.get("dead_letters", 0) == 0 and stats["received"] == 1, stats  # announcements are not frames
    finally:
        for station in (StationId("plant1", "lineA", "st09"), STATION):  # clear the retained messages
            hub.publish(TOPICS.station(station, "model"), b"", qos=1, retain=True).wait_for_publish(5)
        hub.loop_stop()
        hub.disconnect()
        if worker is not None:
            worker.stop()


def test_an_idle_head_is_unloaded_and_loaded_again_when_asked(edge: SplitEdgeRunner, tmp_path: Path) -> None:
    """Weekly versions must not pile up: a head loaded on demand that ran no frame for
    ``keep_idle_s`` is dropped (counted); the configured head stays; a frame of the dropped
    version loads it again."""
    bdir = tmp_path / "bundles"
    rebadge_bundle(BUNDLE, bdir / "1.3.0", "1.3.0", None, roles=("split_edge_int8", "split_hub"))
    pub = Published()
    deployed = load_heads([BUNDLE], threads=2)
    svc = HeadService(deployed, pub, loader=bundles_dir_loader(bdir, 2), keep_idle_s=0.3)
    codes = encode_codes(np.zeros(edge.spec.shape, np.uint8), edge.spec)
    (version,) = deployed
    svc.start()
    try:
        svc.preload("1.3.0")
        deadline = time.monotonic() + 20
        while "1.3.0" not in svc.heads:
            assert time.monotonic() < deadline, svc.stats()
            time.sleep(0.02)
        for i in range(12):  # the deployed version's frames for 1.2 s keep the worker going
            svc.submit(FEATURES, encode_features(header(edge.spec, version, f"old-{i}"), codes))
            time.sleep(0.1)
        pub.wait(12)
        assert "1.3.0" not in svc.heads and version in svc.heads
        assert svc.stats()["heads_unloaded"] == 1
        svc.submit(FEATURES, encode_features(header(edge.spec, "1.3.0", "again"), codes))
        (again,) = [r for r in pub.wait(13) if r.request_id == "again"]
        assert again.status == "ok" and again.bundle_version == "1.3.0"
        assert svc.stats()["heads_loaded"] == 2
    finally:
        svc.stop()


@pytest.mark.parametrize(("change", "counter", "reason"), [
    ({"bundle_version": "0.9.0"}, "refused_version", "no head for bundle version '0.9.0'"),
    ({"channels": 8}, "refused_spec", "differs from bundle"),
    ({"bits": 8}, "refused_spec", "differs from bundle"),
])
def test_mismatches_are_refused_and_counted_never_decoded(service: Any, edge: SplitEdgeRunner, bundle: Any,
                                                          change: dict[str, Any], counter: str,
                                                          reason: str) -> None:
    svc, pub = service()
    fields = {"bundle_version": bundle.manifest.version, **change}
    version = fields.pop("bundle_version")
    msg = encode_features(header(edge.spec, version, "r-x", **fields), b"garbage, never decoded")
    svc.submit(FEATURES, msg)
    (res,) = pub.wait(1)
    assert res.status == "refused" and reason in res.reason and not res.detections
    stats = svc.stats()
    assert stats[counter] == 1 and stats.get("dead_letters", 0) == 0 and stats.get("answered", 0) == 0


def test_malformed_and_truncated_messages_are_dead_lettered(service: Any, edge: SplitEdgeRunner, bundle: Any,
                                                            frames: list[np.ndarray], tmp_path: Path) -> None:
    svc, pub = service()
    batch, _ = preprocess_batch(frames[:1], tuple(bundle.manifest.input_size))
    good = encode_features(header(edge.spec, bundle.manifest.version, "r-ok"),
                           encode_codes(edge.run(batch)[0], edge.spec))
    bad = [
        (FEATURES, b"\x00\x01 not a feature message"),
        (FEATURES, good[: len(good) - 500]),  # truncated codes
        (FEATURES, good[:-1] + bytes([good[-1] ^ 0xFF])),  # corrupt zlib (bad checksum)
        (TOPICS.station(STATION, "samples"), good),  # features on a topic that is not for features
        ("not/a/lineguard/topic", good),
    ]
    for topic, data in bad:
        svc.submit(topic, data)
    svc.submit(FEATURES, good)  # and the service goes on
    (res,) = pub.wait(1)
    assert res.request_id == "r-ok" and res.status == "ok"
    time.sleep(0.1)
    assert len(pub.items) == 1  # dead letters are not answered
    stats = svc.stats()
    assert stats["dead_letters"] == len(bad), stats
    kept = sorted((tmp_path / "dead").glob("*.json"))
    assert len(kept) == len(bad)
    reasons = [json.loads(p.read_text())["reason"] for p in kept]
    assert sum("undecodable codes" in r for r in reasons) == 2
    assert sum("malformed feature message" in r for r in reasons) == 3
    (truncated,) = [p for p, r in zip(kept, reasons, strict=True) if "shorter than" in r]
    assert truncated.with_suffix(".bin").read_bytes() == bad[1][1]


def test_expired_messages_are_dropped(service: Any, edge: SplitEdgeRunner, bundle: Any) -> None:
    svc, pub = service()
    svc.stop()  # let a message wait past its deadline before the worker sees it
    svc.submit(FEATURES, encode_features(header(edge.spec, bundle.manifest.version, "r-old", deadline_ms=1.0),
                                         b"x"))
    time.sleep(0.05)
    svc.start()
    deadline = time.monotonic() + 5
    while svc.stats().get("expired", 0) < 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert not pub.items


def test_mqtt_worker_round_trip_through_the_broker(mosquitto_broker: Any, edge: SplitEdgeRunner, bundle: Any,
                                                   frames: list[np.ndarray], tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    cfg = build_config({"data_dir": str(tmp_path), "mqtt": {"url": f"mqtt://127.0.0.1:{mosquitto_broker.port}"},
                        "heads": {"bundles": [str(BUNDLE)], "threads": 2}})
    worker = start_heads(cfg, client_id="heads-test")
    got: list[bytes] = []
    sub = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"agent-{free_port()}")
    sub.on_message = lambda c, u, m: got.append(bytes(m.payload))
    sub.connect("127.0.0.1", mosquitto_broker.port)
    sub.subscribe(RESULTS, qos=0)
    sub.loop_start()
    try:
        time.sleep(0.3)
        batch, _ = preprocess_batch(frames[:2], tuple(bundle.manifest.input_size))
        for i, c in enumerate(edge.run(batch)):
            sub.publish(FEATURES, encode_features(header(edge.spec, bundle.manifest.version, f"m-{i}"),
                                                  encode_codes(c, edge.spec)), qos=0)
        deadline = time.monotonic() + 20
        while len(got) < 2:
            assert time.monotonic() < deadline, f"got {len(got)} results"
            time.sleep(0.02)
        assert sorted(decode_split_result(g).request_id for g in got) == ["m-0", "m-1"]
        assert worker.subscription == "$share/lineguard-heads/lineguard/v1/+/+/+/features"
    finally:
        sub.loop_stop()
        sub.disconnect()
        with caplog.at_level("INFO", logger="hub.mqtt"):
            worker.stop()
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("head service stopped; counts ")]
    assert json.loads(line.split("counts ", 1)[1])["answered"] == 2, line  # its counters, for whoever stopped it
