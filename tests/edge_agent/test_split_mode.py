"""Split mode end to end on a real broker: the agent's edge part, the hub's head service (hub.server
.start_heads), and the agent's fallback when the hub goes away and comes back."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from edge_agent.config import ConfigError, build_config
from edge_agent.detector import DetectorError, OnnxDetector
from edge_agent.mqtt import MqttConfig, MqttTransport
from edge_agent.split_detector import SplitDetector
from edge_agent.transport import MemoryTransport, Message
from hub.core.config import build_config as build_hub_config
from hub.mqtt import HeadMqttWorker
from hub.server import start_heads
from lineguard_contract import StationId, Topics
from lineguard_contract.features import SplitResultPayload, decode_features, encode_split_result
from models.bundle import load_bundle
from models.detections import Detections
from models.processing import letterbox
from models.signing import rebadge_bundle
from tests.conftest import free_port, sample_frames

ROOT = Path(__file__).resolve().parents[2]
BUNDLE = ROOT / "models" / "default"
STATION = StationId("plant1", "lineA", "st03")


@pytest.fixture(scope="module")
def bundle() -> Any:
    return load_bundle(BUNDLE, roles=("onnx_int8", "split_edge_int8"))


@pytest.fixture(scope="module")
def frames() -> list[np.ndarray]:
    return sample_frames(0, 300, 5)


@pytest.fixture
def heads(mosquitto_broker: Any, tmp_path: Path) -> Iterator[Callable[[], HeadMqttWorker]]:
    cfg = build_hub_config({"data_dir": str(tmp_path / "hub"),
                            "mqtt": {"url": f"mqtt://127.0.0.1:{mosquitto_broker.port}"},
                            "heads": {"bundles": [str(BUNDLE)], "threads": 1, "max_delay_ms": 2}})
    made: list[HeadMqttWorker] = []

    def start() -> HeadMqttWorker:
        w = start_heads(cfg, client_id=f"heads-{len(made)}")
        made.append(w)
        return w

    yield start
    for w in made:
        w.stop()


@pytest.fixture
def agent_transport(mosquitto_broker: Any) -> Iterator[MqttTransport]:
    t = MqttTransport(MqttConfig(client_id=f"agent-{free_port()}", port=mosquitto_broker.port))
    t.start()
    deadline = time.monotonic() + 10
    while not t.connected:
        assert time.monotonic() < deadline, "agent transport did not connect"
        time.sleep(0.02)
    yield t
    t.stop()


def local(bundle: Any) -> OnnxDetector:
    return OnnxDetector(bundle, workers=1)


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    x1, y1 = np.maximum(a[0], b[:, 0]), np.maximum(a[1], b[:, 1])
    x2, y2 = np.minimum(a[2], b[:, 2]), np.minimum(a[3], b[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) - inter)


def matched(src: Detections, ref: Detections) -> int:
    """Detections of ``src`` that ``ref`` has too: same class, IoU >= 0.5."""
    n = 0
    for box, cls in zip(src.boxes, src.class_ids, strict=True):
        same = ref.class_ids == cls
        n += bool(same.any() and (_iou(box, ref.boxes[same]) >= 0.5).any())
    return n


def test_split_and_full_agree_on_the_sample_video(heads: Any, agent_transport: MqttTransport, bundle: Any,
                                                  frames: list[np.ndarray]) -> None:
    heads()
    split = SplitDetector(bundle, agent_transport, STATION, "agent-st03", mode="split", deadline_ms=2000)
    split.load()
    full = local(bundle)
    full.load()
    n_full = n_split = full_in_split = split_in_full = 0
    jpeg = []
    for f in frames:
        (a,), (b,) = full.detect([f]), split.detect([f])
        assert not b.undecided
        n_full, n_split = n_full + len(a), n_split + len(b)
        full_in_split += matched(a, b)
        split_in_full += matched(b, a)
        jpeg.append(len(cv2.imencode(".jpg", letterbox(f, full.input_size)[0], [cv2.IMWRITE_JPEG_QUALITY, 90])[1]))
    st = split.stats()
    assert st["split_frames"] == len(frames) and st.get("undecided_frames", 0) == 0, st
    assert n_full >= 10, "the sample should hold defects"
    # measured 2026-11-23 with bundle 1.1.0: 82% of the full model's detections found by split, 99% the other way
    assert full_in_split >= 0.75 * n_full, (full_in_split, n_full)
    assert split_in_full >= 0.9 * n_split, (split_in_full, n_split)
    # the bandwidth target: whole feature messages (header included) <= 25% of the JPEG q90 of the same input
    per_frame = st["bytes_sent"] / st["messages_sent"]
    assert per_frame <= 0.25 * float(np.mean(jpeg)), (per_frame, float(np.mean(jpeg)))


def test_hub_killed_mid_stream_falls_back_and_returns(heads: Any, agent_transport: MqttTransport, bundle: Any,
                                                      frames: list[np.ndarray]) -> None:
    worker = heads()
    det = SplitDetector(bundle, agent_transport, STATION, "agent-st03", mode="auto", fallback=local(bundle),
                        deadline_ms=400, fallback_after=2, probe_interval_s=0.3)
    det.load()
    for f in frames[:5]:
        det.detect([f])
    assert det.stats()["split_frames"] == 5 and det.state == "split"
    worker.stop()  # the hub goes away mid-stream
    times = []
    for f in frames[5:15]:
        t = time.monotonic()
        (d,) = det.detect([f])
        times.append(time.monotonic() - t)
        assert not d.undecided
    st = det.stats()
    assert st["state"] == "local" and st["switches_to_local"] == 1, st
    assert st["fallback_frames"] == 2 and st["local_frames"] == 8, st  # 2 misses, then local without waiting
    # the local model's own time for the same frames, now (on a loaded machine it is not 40 ms)
    alone = local(bundle)
    alone.load()
    own = []
    for f in frames[5:15]:
        t = time.monotonic()
        alone.detect([f])
        own.append(time.monotonic() - t)
    assert max(times) < 0.4 + max(own) + 0.5, (times, own)  # never much past the deadline
    assert max(times[2:]) < max(own) + 0.3, (times, own)  # once local, no waiting for the hub (0.4 s) at all
    heads()  # the hub is back
    deadline = time.monotonic() + 15
    i = 15
    while det.state != "split":
        assert time.monotonic() < deadline, det.stats()
        det.detect([frames[i % len(frames)]])
        i += 1
        time.sleep(0.05)
    before = det.stats()["split_frames"]
    det.detect([frames[0]])
    st = det.stats()
    assert st["switches_to_split"] == 1 and st["split_frames"] == before + 1, st


def test_split_mode_without_hub_marks_frames_undecided(mosquitto_broker: Any, agent_transport: MqttTransport,
                                                       bundle: Any, frames: list[np.ndarray]) -> None:
    det = SplitDetector(bundle, agent_transport, STATION, "agent-st03", mode="split", deadline_ms=150)
    det.load()
    out = det.detect(frames[:3])
    assert [d.undecided for d in out] == [True] * 3 and all(len(d) == 0 for d in out)
    assert det.stats()["undecided_frames"] == 3


class RefusingHub(MemoryTransport):
    """Answers every feature message at once with a refusal (a hub without this bundle version)."""

    def publish(self, message: Message) -> int:
        mid = super().publish(message)
        header, _ = decode_features(message.payload)
        topic = Topics().station(STATION, "split_results")
        self.deliver(topic, encode_split_result(SplitResultPayload(
            request_id=header.request_id, camera=header.camera, bundle_version=header.bundle_version,
            status="refused", reason=f"no head for bundle version {header.bundle_version!r}")))
        return mid


def test_a_refused_version_is_counted_and_the_frame_runs_locally(bundle: Any, frames: list[np.ndarray]) -> None:
    t = RefusingHub()
    t.start()
    det = SplitDetector(bundle, t, STATION, "agent-st03", mode="auto", fallback=local(bundle), deadline_ms=1000,
                        fallback_after=5)
    det.load()
    start = time.monotonic()
    out = det.detect(frames[:2])
    assert time.monotonic() - start < 1.0  # a refusal does not wait for the deadline
    st = det.stats()
    assert st["refused"] == 2 and st["fallback_frames"] == 2 and len(out) == 2, st


class AnsweringHub(MemoryTransport):
    """Answers every feature message at once (ok, no boxes), to whoever holds the results topic now."""

    def publish(self, message: Message) -> int:
        mid = super().publish(message)
        header, _ = decode_features(message.payload)
        self.deliver(Topics().station(STATION, "split_results"), encode_split_result(SplitResultPayload(
            request_id=header.request_id, camera=header.camera, bundle_version=header.bundle_version, status="ok")))
        return mid


def test_a_swap_hands_the_replaced_detector_its_answers(bundle: Any, frames: list[np.ndarray]) -> None:
    """The new split detector takes the results topic when it loads; a batch the old one still
    runs gets its answers through the new one (without that hand-over it would wait out its
    deadline and mark the frames undecided)."""
    t = AnsweringHub()
    t.start()
    old = SplitDetector(bundle, t, STATION, "agent-st03", mode="split", deadline_ms=3000)
    old.load()
    assert len(old.detect(frames[:2])) == 2 and old.stats()["split_frames"] == 2
    new = SplitDetector(bundle, t, STATION, "agent-st03", mode="split", deadline_ms=3000, previous=old)
    new.load()
    start = time.monotonic()
    out = old.detect(frames[:2])  # the batch the old detector had in hand at the swap
    assert time.monotonic() - start < 2.0 and not any(d.undecided for d in out)
    assert old.stats()["split_frames"] == 4 and old.stats().get("undecided_frames", 0) == 0, old.stats()
    new.detect(frames[:1])
    st = new.stats()
    assert st["split_frames"] == 3 and st.get("late_results", 0) == 0, st  # 2 carried over at the swap, 1 its own


class LateHub(MemoryTransport):
    """Answers each feature message 0.3 s later, saying it spent 180 ms on it."""

    def publish(self, message: Message) -> int:
        mid = super().publish(message)
        header, _ = decode_features(message.payload)
        answer = encode_split_result(SplitResultPayload(
            request_id=header.request_id, camera=header.camera, bundle_version=header.bundle_version, status="ok",
            hub_ms=180.0))
        threading.Timer(0.3, self.deliver, (Topics().station(STATION, "split_results"), answer)).start()
        return mid


def test_late_answers_are_counted_with_the_hubs_time(bundle: Any, frames: list[np.ndarray]) -> None:
    """An answer after the deadline is dropped, counted, and its hub time kept: an operator can
    tell a slow hub (hub_ms near the deadline) from a slow way there and back."""
    t = LateHub()
    t.start()
    det = SplitDetector(bundle, t, STATION, "agent-st03", mode="split", deadline_ms=100)
    det.load()
    out = det.detect(frames[:2])
    assert [d.undecided for d in out] == [True, True]
    deadline = time.monotonic() + 5
    while det.stats().get("late_results", 0) < 2:
        assert time.monotonic() < deadline, det.stats()
        time.sleep(0.02)
    assert list(det.late_hub_ms) == [180.0, 180.0] and det.stats()["undecided_frames"] == 2


class ScriptedHub(MemoryTransport):
    """Answers feature messages with ``status`` (None: never), keeping each message's header."""

    def __init__(self, status: str | None) -> None:
        super().__init__()
        self.status, self.headers = status, []

    def publish(self, message: Message) -> int:
        mid = super().publish(message)
        header, _ = decode_features(message.payload)
        self.headers.append(header)
        if self.status is not None:
            self.deliver(Topics().station(STATION, "split_results"), encode_split_result(SplitResultPayload(
                request_id=header.request_id, camera=header.camera, bundle_version=header.bundle_version,
                status=self.status, reason="no head for bundle version here" if self.status == "refused" else "")))
        return mid


@pytest.mark.parametrize(("mode", "status", "loads", "unanswered"), [
    ("split", "ok", True, 0),
    ("split", "refused", False, 0),  # the update is refused: every frame would go undecided
    ("auto", "refused", True, 0),  # it runs locally instead
    ("split", None, True, 1),  # a hub away is away for every version: the swap goes on
])
def test_an_update_warms_the_hubs_head_before_the_swap(bundle: Any, mode: str, status: str | None, loads: bool,
                                                      unanswered: int) -> None:
    """A split detector replacing another sends the hub one frame of its version and waits for the
    answer before it is swapped in, so the hub loads that version's head while the old detector
    still runs the line; the frame carries the warm-up's deadline, not a live frame's."""
    t = ScriptedHub("ok")
    t.start()
    fallback = local(bundle) if mode == "auto" else None
    old = SplitDetector(bundle, t, STATION, "agent-st03", mode=mode, fallback=fallback, deadline_ms=250)
    old.load()
    assert t.headers == []  # a first start sends nothing
    t.status = status
    new = SplitDetector(bundle, t, STATION, "agent-st03", mode=mode, fallback=local(bundle) if fallback else None,
                        deadline_ms=250, previous=old, hub_warmup_s=0.5)
    if loads:
        new.load()
    else:
        with pytest.raises(DetectorError, match="cannot run bundle 1.2.0's head"):
            new.load()
    assert len(t.headers) == 1 and t.headers[0].deadline_ms == 500.0, t.headers
    assert new.stats().get("hub_warmup_unanswered", 0) == unanswered


def test_a_split_agent_takes_an_update_and_the_hub_loads_its_head(mosquitto_broker: Any, tmp_path: Path) -> None:
    """A split agent with a bundle store installs 1.3.0 (edge part and local model), swaps to it
    between frames, and the head service, which was started with 1.2.0 only, loads 1.3.0's head
    from the hub's bundles directory on its first frame: no frame falls back or goes undecided."""
    from edge_agent.agent import Agent
    from edge_agent.swap import SwappableDetector
    from tests.edge_agent.test_agent import _cfg

    bundles = tmp_path / "hub" / "bundles"
    new = rebadge_bundle(BUNDLE, bundles / "1.3.0", "1.3.0", None,
                         roles=("onnx_int8", "split_edge_int8", "split_hub"))
    hub_cfg = build_hub_config({"data_dir": str(tmp_path / "hub"),
                                "mqtt": {"url": f"mqtt://127.0.0.1:{mosquitto_broker.port}"},
                                "heads": {"bundles": [str(BUNDLE)], "bundles_dir": str(bundles), "threads": 1,
                                          "max_delay_ms": 2}})
    heads = start_heads(hub_cfg, client_id="heads-update")
    cfg = _cfg(tmp_path, mosquitto_broker.port, split={"mode": "auto", "deadline_ms": 3000},
               model={"bundle": str(BUNDLE), "store": str(tmp_path / "store")},
               cameras=[{"id": "cam1", "source": str(ROOT / "sample_data" / "line_1080p.mp4"), "realtime": True}])
    agent = Agent(cfg)
    try:
        assert isinstance(agent.detector, SwappableDetector) and isinstance(agent.detector.active, SplitDetector)
        assert agent.store is not None and agent.store.roles == ("split_edge_int8", "onnx_int8")
        agent.start()
        deadline = time.monotonic() + 60
        while agent.detector.stats().get("split_frames", 0) < 3:
            assert time.monotonic() < deadline, agent.detector.stats()
            time.sleep(0.05)
        agent._activate(agent.store.install(new))  # what the updater does with an announced bundle
        assert agent.detector.version == "1.3.0" and agent.store.current_version() == "1.3.0"
        before = agent.detector.stats()["split_frames"]
        while not agent.finished():
            assert time.monotonic() < deadline + 120, "the agent did not finish the video in time"
            time.sleep(0.2)
        st = agent.detector.stats()
        assert st["split_frames"] > before, st  # frames answered by 1.3.0's head
        assert st.get("fallback_frames", 0) == 0 and st.get("refused", 0) == 0, st
        hs = heads.service.stats()
        assert hs["heads_loaded"] == 1 and hs.get("refused_version", 0) == 0, hs
    finally:
        agent.stop(drain_s=2)
        heads.stop()


def test_auto_mode_needs_a_local_model(bundle: Any) -> None:
    with pytest.raises(DetectorError, match="needs a local model"):
        SplitDetector(bundle, MemoryTransport(), STATION, "agent-st03", mode="auto")


@pytest.mark.parametrize(("split", "error"), [
    ({"mode": "halfway"}, "split.mode"),
    ({"deadline_ms": 0}, "split.deadline_ms"),
    ({"fallback_after": 0}, "split.fallback_after"),
    ({"probe": 1}, "split.probe"),
])
def test_split_config_errors_name_the_key(split: dict[str, Any], error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        build_config({"cameras": [{"id": "cam0", "source": "x.mp4"}], "split": split})


def test_the_agent_runs_the_sample_video_in_split_mode(heads: Any, mosquitto_broker: Any, tmp_path: Path) -> None:
    import urllib.request

    from edge_agent.agent import Agent
    from tests.edge_agent.test_agent import _cfg

    heads()
    cfg = _cfg(tmp_path, mosquitto_broker.port, split={"mode": "auto", "deadline_ms": 2000})
    agent = Agent(cfg)
    assert isinstance(agent.detector, SplitDetector) and agent.detector.fallback is not None
    agent.start()
    try:
        deadline = time.monotonic() + 180
        while not agent.finished():
            assert time.monotonic() < deadline, "the agent did not finish the video in time"
            time.sleep(0.2)
        st = agent.detector.stats()
        # a replay without pacing keeps the newest frame while the model is busy: every frame that
        # reached the model was answered by the hub, none fell back
        processed = agent.metrics.frames_processed.labels("cam1")._value.get()
        assert st["split_frames"] == processed >= 10 and st.get("fallback_frames", 0) == 0, (st, processed)
        text = urllib.request.urlopen(f"http://127.0.0.1:{cfg.metrics.port}/metrics", timeout=5).read().decode()
        assert f'lineguard_split{{counter="split_frames"}} {float(processed)}' in text
        assert "lineguard_split_local 0.0" in text
    finally:
        agent.stop(drain_s=2)


def test_unanswered_probes_do_not_pile_up(bundle: Any, frames: list[np.ndarray]) -> None:
    t = MemoryTransport()
    t.start()
    det = SplitDetector(bundle, t, STATION, "agent-st03", mode="auto", fallback=local(bundle), deadline_ms=50,
                        fallback_after=1, probe_interval_s=0.001)
    det.load()
    small = [cv2.resize(frames[0], (320, 180))]
    for _ in range(80):
        det.detect(small)
    st = det.stats()
    assert st["state"] == "local" and st["probes"] >= 70, st
    assert len(det._probes) <= 64 and len(det._waiting) <= 64
