"""The staged rollout: canary stations chosen by share, canary against control health, the
verdict (wait / promote / rollback) and what promote and rollback announce."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from hub.canary import CanaryRule
from hub.registry import get, register
from hub.rollout import RolloutError, choose_canary, decide_canary, promote, rollback, start_canary
from hub.tables import Agent, ModelAnnouncement, ModelEvent, Station
from lineguard_contract import Detection, StationId, Topics, decode
from tests.hub.test_rollout import make_version

ROOT = Path(__file__).resolve().parents[2]
STATIONS = [StationId("plant1", "lineA", f"st{i:02d}") for i in range(10)]
URL = "https://hub.example:8443"


@pytest.mark.parametrize(("n", "share", "expected"), [(10, 0.1, 1), (10, 0.25, 3), (10, 1.0, 10), (1, 0.01, 1),
                                                      (10, 0.0, "share"), (10, 1.5, "share")])
def test_choose_canary(n: int, share: float, expected: int | str) -> None:
    if isinstance(expected, str):
        with pytest.raises(RolloutError, match=expected):
            choose_canary(STATIONS[:n], "1.1.0", share)
        return
    got = choose_canary(STATIONS[:n], "1.1.0", share)
    assert len(got) == expected and got == choose_canary(list(reversed(STATIONS[:n])), "1.1.0", share)
    assert set(got) <= set(STATIONS[:n])


class Bus:
    def __init__(self) -> None:
        self.sent: list[tuple[str, Any]] = []

    def __call__(self, topic: str, data: bytes) -> None:
        self.sent.append((topic, decode("model", data)))


@pytest.fixture
def fleet(hub_store: Any, sample_factory: Any, tmp_path: Path) -> Any:
    base = ROOT / "models" / "default"
    for v in ("1.0.0", "1.1.0"):
        make_version(base, tmp_path / "b" / v, v, None)
    # every station has sent a sample (that is how the hub knows it) with production 1.0.0
    hub_store.ingest([sample_factory(seed=i, station=sid, model_version="1.0.0") for i, sid in enumerate(STATIONS)])
    with hub_store.sessions.begin() as s:
        register(s, tmp_path / "b" / "1.0.0", actor="t", status="production")
        register(s, tmp_path / "b" / "1.1.0", actor="t")
    return hub_store


def _agents(s: Any, versions: dict[StationId, str], *, latency: dict[str, float] | None = None,
            offline: set[StationId] = frozenset(), now: datetime | None = None) -> None:
    now = now or datetime.now(UTC)
    for sid, v in versions.items():
        st = s.query(Station).filter_by(site=sid.site, line=sid.line, station=sid.station).one()
        s.add(Agent(station_id=st.id, agent_id=f"agent-{sid.station}", state="offline" if sid in offline else "online",
                    model_version=v, last_seen=now, fps=30.0, latency_p99_ms=(latency or {}).get(v, 40.0),
                    dropped_frames=0, outbox_depth=0))


def _samples(fleet: Any, sample_factory: Any, version: str, n: int, score: float, seed0: int) -> None:
    fleet.ingest([sample_factory(seed=seed0 + i, station=STATIONS[i % len(STATIONS)], model_version=version,
                                 detections=[Detection(cls="scratch", score=score, box=[1.0, 2.0, 30.0, 40.0])])
                  for i in range(n)])


def test_start_canary_announces_to_the_share(fleet: Any) -> None:
    bus = Bus()
    with fleet.sessions.begin() as s:
        chosen = start_canary(s, bus, "1.1.0", public_url=URL, actor="ada", share=0.2)
        assert get(s, "1.1.0").status == "canary" and len(chosen) == 2
    assert [t for t, _ in bus.sent] == [Topics().station(c, "model") for c in chosen]
    ann = bus.sent[0][1]
    assert ann.version == "1.1.0" and ann.stage == "canary" and not ann.pinned
    assert ann.base_url == f"{URL}/api/v1/bundles/1.1.0/"
    with fleet.sessions.begin() as s, pytest.raises(RolloutError, match="rejected|candidate|canary"):
        start_canary(s, bus, "1.1.0", public_url=URL, actor="ada", share=0.2)  # already in canary


@pytest.mark.parametrize(("setup", "minutes", "decision", "reason"), [
    ({}, 10, "wait", "window"),
    ({}, 61, "promote", None),
    ({"latency": {"1.1.0": 130.0}}, 10, "rollback", "latency"),
    ({"offline": True}, 10, "rollback", "agents online"),
    ({"canary_score": 0.3}, 61, "rollback", "score distribution"),
    ({"canary_samples": 120}, 61, "rollback", "detection rate"),
    ({"no_canary_agents": True}, 61, "wait", "canary agents report"),
])
def test_verdict(fleet: Any, sample_factory: Any, setup: dict[str, Any], minutes: float, decision: str,
                 reason: str | None) -> None:
    with fleet.sessions.begin() as s:
        canary = start_canary(s, Bus(), "1.1.0", public_url=URL, actor="t", share=0.2)
        versions = {sid: ("1.1.0" if sid in canary and not setup.get("no_canary_agents") else "1.0.0")
                    for sid in STATIONS}
        _agents(s, versions, latency=setup.get("latency"), offline=set(canary) if setup.get("offline") else set(),
                now=datetime.now(UTC) + timedelta(minutes=minutes))  # heard from just before the check
    n_can = setup.get("canary_samples", 24)
    _samples(fleet, sample_factory, "1.1.0", n_can, setup.get("canary_score", 0.8), 1000)
    _samples(fleet, sample_factory, "1.0.0", 96, 0.8, 2000)  # 8 control agents, 2 canary: same rate per agent
    with fleet.sessions() as s:
        v = decide_canary(s, "1.1.0", CanaryRule(window_min=60, min_samples=20),
                          now=datetime.now(UTC) + timedelta(minutes=minutes))
    assert v.decision == decision, (v.reasons, v.checks)
    if reason:
        assert any(reason in r for r in v.reasons), v.reasons


def test_promote_and_rollback_announce(fleet: Any) -> None:
    bus = Bus()
    with fleet.sessions.begin() as s:
        canary = start_canary(s, bus, "1.1.0", public_url=URL, actor="t", share=0.2)
        _agents(s, {sid: ("1.1.0" if sid in canary else "1.0.0") for sid in STATIONS})
    bus.sent.clear()
    with fleet.sessions.begin() as s:
        assert rollback(s, bus, "1.1.0", public_url=URL, actor="ada", reason="canary worse") == 2
        assert get(s, "1.1.0").status == "rejected" and get(s, "1.0.0").status == "production"
    assert {t for t, _ in bus.sent} == {Topics().station(c, "model") for c in canary}
    assert all(a.version == "1.0.0" and a.pinned and a.stage == "rollback" for _, a in bus.sent)
    with fleet.sessions.begin() as s, pytest.raises(RolloutError, match="rejected"):
        start_canary(s, bus, "1.1.0", public_url=URL, actor="t", share=0.2)  # a rejected version never returns


def test_rollback_reaches_every_station_told_the_canary_even_one_not_reporting_it(fleet: Any) -> None:
    """From the recorded announcements, not the audit text: one canary station's agent still
    reports production (it was offline when the canary was announced; the retained message waits)."""
    bus = Bus()
    with fleet.sessions.begin() as s:
        canary = start_canary(s, bus, "1.1.0", public_url=URL, actor="t", share=0.3)
        _agents(s, {sid: ("1.1.0" if sid == canary[0] else "1.0.0") for sid in STATIONS})
        for ev in s.scalars(select(ModelEvent)):
            ev.reason = "edited by hand"  # the audit text says nothing about whom to reach
        told = s.scalars(select(ModelAnnouncement).order_by(ModelAnnouncement.id)).all()
        assert [(a.site, a.line, a.station, a.stage, a.pinned) for a in told] == [
            (c.site, c.line, c.station, "canary", False) for c in canary]
    bus.sent.clear()
    with fleet.sessions.begin() as s:
        assert rollback(s, bus, "1.1.0", public_url=URL, actor="ada", reason="canary worse") == len(canary) == 3
    assert sorted(t for t, _ in bus.sent) == sorted(Topics().station(c, "model") for c in canary)


def test_promote_announces_to_every_station(fleet: Any, tmp_path: Path) -> None:
    bus = Bus()
    with fleet.sessions.begin() as s:
        start_canary(s, bus, "1.1.0", public_url=URL, actor="t", stations=STATIONS[:1])
        bus.sent.clear()
        assert promote(s, bus, "1.1.0", public_url=URL, actor="ada", reason="looks good") == len(STATIONS)
        assert get(s, "1.1.0").status == "production" and get(s, "1.0.0").status == "retired"
    assert len(bus.sent) == len(STATIONS) and all(a.stage == "production" and not a.pinned for _, a in bus.sent)


def test_the_watcher_starts_a_canary_for_a_gated_candidate_then_promotes(fleet: Any, sample_factory: Any,
                                                                          mosquitto_broker: Any,
                                                                          tmp_path: Path) -> None:
    import json

    from hub.core.config import build_config
    from hub.rollout_worker import check_rollouts
    from hub.tables import ModelVersion

    data = json.loads(fleet.config.model_dump_json(exclude_none=True))
    config = build_config({**data, "mqtt": {"url": f"mqtt://127.0.0.1:{mosquitto_broker.port}"},
                           "rollout": {"public_url": URL, "canary_share": 0.2, "window_min": 0.0001,
                                       "min_samples": 0}})
    assert check_rollouts(config, fleet.sessions) == []  # 1.1.0 has no passed gate: nothing to do
    with fleet.sessions.begin() as s:
        row = s.query(ModelVersion).filter_by(version="1.1.0").one()
        row.metrics_json = json.dumps({"gate": {"passed": True}})
    (done,) = check_rollouts(config, fleet.sessions)
    assert done.startswith("canary 1.1.0 on 2 stations")
    with fleet.sessions.begin() as s:
        canary = choose_canary(STATIONS, "1.1.0", 0.2)  # what the watcher picked (deterministic)
        _agents(s, {sid: ("1.1.0" if sid in canary else "1.0.0") for sid in STATIONS})
    (done,) = check_rollouts(config, fleet.sessions)
    assert done == f"promoted 1.1.0 to {len(STATIONS)} stations"
    with fleet.sessions() as s:
        assert get(s, "1.1.0").status == "production"
