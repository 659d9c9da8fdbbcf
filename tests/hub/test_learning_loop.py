"""The whole learning loop at CI scale, every component real: an agent on the sample video sends
defect samples through Mosquitto -> the hub's ingest worker stores them -> a reviewer confirms them
through the REST API -> a retraining job (one epoch at 160 px: plumbing, not accuracy; the rule is
permissive) trains, exports, gates, signs and registers 1.3.0 -> a canary announcement reaches the
agent -> it fetches the bundle from the hub's API, verifies the signature, installs and swaps ->
the agent runs 1.3.0 and keeps sending samples."""

from __future__ import annotations

import contextlib
import json
import shutil
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("ultralytics")

from edge_agent.agent import Agent  # noqa: E402
from edge_agent.config import build_config as agent_config  # noqa: E402
from hub.accounts import create_token, create_user  # noqa: E402
from hub.core.config import build_config  # noqa: E402
from hub.core.db import make_session_factory  # noqa: E402
from hub.gate import GateRule  # noqa: E402
from hub.ingest import IngestWorker  # noqa: E402
from hub.mqtt import RetainedPublisher  # noqa: E402
from hub.registry import get, register  # noqa: E402
from hub.retrain import RetrainJob, RetrainSettings  # noqa: E402
from hub.rollout import start_canary  # noqa: E402
from hub.tables import Sample  # noqa: E402
from lineguard_contract import StationId  # noqa: E402
from models.signing import generate_keypair, load_private_key, sign_bundle  # noqa: E402
from models.synth.dataset import generate_dataset  # noqa: E402
from tests.hub.conftest import hub_app, live_app  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
STATION = StationId("plant1", "lineA", "st03")
pytestmark = pytest.mark.slow


def _wait(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_agent_to_hub_to_review_to_retrain_to_rollout_to_agent(hub_store: Any, mosquitto_broker: Any, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    priv, pub = generate_keypair(tmp_path / "keys")
    prod = tmp_path / "bundles" / "1.2.0"
    shutil.copytree(ROOT / "models" / "default", prod, ignore=shutil.ignore_patterns("split_*"))
    sign_bundle(prod, load_private_key(priv))
    synth = generate_dataset(tmp_path / "synth", seed=7, preset="tiny", workers=1, progress=False)
    data = json.loads(hub_store.config.model_dump_json(exclude_none=True))
    config = build_config({**data, "mqtt": {"url": f"mqtt://127.0.0.1:{mosquitto_broker.port}"}})
    engine = hub_store.sessions.kw["bind"]
    with hub_store.sessions.begin() as s:
        register(s, prod, actor="test", status="production")
        create_user(s, "rita", "pw-long-enough-1", "reviewer")
        create_user(s, "fleet", "pw-long-enough-2", "viewer")
        rita, fleet = create_token(s, "rita", "review"), create_token(s, "fleet", "agents")
    stack = contextlib.ExitStack()
    url = stack.enter_context(live_app(hub_app(config, engine, hub_store.blobs)))
    ingest = IngestWorker(config, blobs=hub_store.blobs, migrate=False)
    ingest.start()
    monkeypatch.setenv("LINEGUARD_AGENT_TOKEN", fleet)
    agent = Agent(agent_config({
        "identity": {"site": STATION.site, "line": STATION.line, "station": STATION.station},
        "cameras": [{"id": "cam1", "source": str(ROOT / "sample_data" / "line_1080p.mp4"), "loop": True}],
        "model": {"bundle": str(prod), "store": str(tmp_path / "store"), "public_keys": [str(pub)]},
        "mqtt": {"url": f"mqtt://127.0.0.1:{mosquitto_broker.port}"},
        "sampling": {"max_per_minute": 600},
        "outbox": {"path": str(tmp_path / "outbox.db")},
        "metrics": {"port": 0}}))  # no fixed port: another agent on the machine must not fail this test
    agent.start()
    try:
        assert ingest.wait_subscribed(15)
        # 1. agent -> broker -> hub: defect samples arrive in the database
        def stored() -> int:
            with hub_store.sessions() as s:
                return s.query(Sample).filter(Sample.reason == "defect").count()
        _wait(lambda: stored() >= 8, 90, "defect samples did not reach the hub")
        # 2. review through the API (a reviewer's token): confirm what the model saw
        req = urllib.request.Request(f"{url}/api/v1/samples?status=new&page_size=50",
                                     headers={"Authorization": f"Bearer {rita}"})
        with urllib.request.urlopen(req) as r:  # noqa: S310 (the test's own server)
            items = json.loads(r.read())["items"]
        reviewed = 0
        for it in items:
            if not it.get("detections"):
                continue
            body = json.dumps({"action": "confirm"}).encode()
            req = urllib.request.Request(f"{url}/api/v1/samples/{it['sample_id']}/review", data=body, method="POST",
                                         headers={"Authorization": f"Bearer {rita}",
                                                  "Content-Type": "application/json"})
            with urllib.request.urlopen(req) as r:  # noqa: S310
                assert r.status == 200
            reviewed += 1
        assert reviewed >= 5, items
        # 3. retrain -> gate -> sign -> register
        settings = RetrainSettings(golden=synth, bundles_dir=tmp_path / "bundles", signing_key=priv,
                                   replay_data=synth, replay_images=8, preset="retrain-ci", workers=0, val_share=0.5,
                                   reviewed_repeats=2, rule=GateRule(max_recall_drop=1.0, min_new_data_gain=-1.0,
                                                 max_false_alarm_rise=None))
        # as `lineguard-hub retrain` does: IMMEDIATE transactions on SQLite (the ingest worker writes meanwhile)
        job = RetrainJob.create(tmp_path / "jobs", settings, make_session_factory(engine, immediate=True),
                                hub_store.blobs)
        st = job.run()
        assert st.steps_done[-1] == "register"
        assert st.status == "succeeded" and st.candidate_version == "1.3.0", st
        # the replay data here is the golden set's own dataset: its val frames are the golden set, left out
        counts = json.loads((job.work / "dataset.json").read_text())["counts"]
        assert counts["replay"]["val"] == 0 and counts["golden_left_out"]["replay_val"] > 0, counts
        assert counts["replay"]["train"] == 8 and counts["golden_left_out"]["replay_train"] == 0, counts
        train_frames = sorted(p.name for p in (job.work / "train_data" / "images" / "train").iterdir())
        reviewed_train = [n for n in train_frames if not n.startswith(("replay_", "copy"))]
        assert counts["reviewed_repeats"] == {"train": 2} and len(reviewed_train) == counts["reviewed"]["train"] > 0
        assert len(train_frames) == 8 + 2 * len(reviewed_train), train_frames  # each reviewed frame placed twice
        assert sorted(n.removeprefix("copy1_") for n in train_frames if n.startswith("copy1_")) == reviewed_train
        # 4. canary to the agent's station -> fetch, verify, install, swap
        writes = make_session_factory(engine, immediate=True)
        with writes.begin() as s, RetainedPublisher(config.mqtt, "hub-test-rollout") as bus:
            assert start_canary(s, bus.publish, "1.3.0", public_url=url, actor="test", stations=[STATION]) == [STATION]
        _wait(lambda: agent.detector.version == "1.3.0", 60,
              f"the agent did not switch: {agent.updater.counters} {agent.updater.last_error}")
        assert agent.store.current_version() == "1.3.0"
        frames = agent.batcher.stats().frames  # type: ignore[union-attr]
        _wait(lambda: agent.batcher.stats().frames > frames + 10, 30, "no frames on 1.3.0")  # type: ignore[union-attr]
        st2 = agent.batcher.stats()  # type: ignore[union-attr]
        assert st2.detector_errors == 0 and st2.frames_failed == 0
        # 5. the hub hears about it: samples from 1.3.0 and the agent's heartbeat
        def on_new() -> bool:
            with hub_store.sessions() as s:
                return s.query(Sample).filter(Sample.model_version == "1.3.0").count() > 0
        _wait(on_new, 60, "no sample from 1.3.0 reached the hub")
        with hub_store.sessions() as s:
            assert get(s, "1.3.0").status == "canary" and get(s, "1.2.0").status == "production"
    finally:
        agent.stop(drain_s=0)
        ingest.stop()
        stack.close()
