"""The ingest pipeline driven directly (no broker), against SQLite and PostgreSQL: batches (one
transaction, duplicates and poison messages inside a batch, database failures) and the fleet
rule that folds status and heartbeat messages into ``agents``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

import hub.pipeline as pipeline_module
from hub.blobs import FileBlobStore, sha256_hex
from hub.core.db import make_engine, make_session_factory, upgrade
from hub.pipeline import IngestError, IngestPipeline, Outcome
from hub.tables import Agent, DeadLetter, Detection, Sample
from lineguard_contract import HeartbeatPayload, SamplePayload, StationId, StatusPayload, Topics, encode

TOPICS = Topics()
STATION = StationId("plant1", "lineA", "st03")
T1 = 1767225600.0  # an agent run's first online status


@pytest.fixture
def pipe(db_url: str, tmp_path: Path) -> Iterator[IngestPipeline]:
    upgrade(db_url)
    engine = make_engine(db_url)
    p = IngestPipeline(make_session_factory(engine), FileBlobStore(tmp_path / "blobs"))
    yield p
    p.close()
    engine.dispose()


def rows(p: IngestPipeline, fn: Callable[[Session], Any]) -> Any:
    with p.sessions() as s:
        return fn(s)


def count(p: IngestPipeline, table: Any) -> int:
    return int(rows(p, lambda s: s.scalar(select(func.count()).select_from(table))))


def sample_msg(p: SamplePayload) -> tuple[str, bytes]:
    return TOPICS.station(p.station_id, "samples"), encode(p)


# -- batches --------------------------------------------------------------------------------------
def test_a_batch_is_stored_in_one_go_and_the_same_sample_twice_once(
        pipe: IngestPipeline, sample_factory: Callable[..., SamplePayload]) -> None:
    a, b = sample_factory(seed=1, n_dets=2), sample_factory(seed=2, n_dets=1)
    same_image = sample_factory(seed=1, n_dets=0)  # another sample, the same JPEG as a: one blob
    outcomes = pipe.handle_batch([sample_msg(a), sample_msg(b), sample_msg(a), sample_msg(same_image)])
    assert outcomes == [Outcome.STORED, Outcome.STORED, Outcome.DUPLICATE, Outcome.STORED]
    assert count(pipe, Sample) == 3
    assert count(pipe, Detection) == 3  # a's two, once; b's one
    assert rows(pipe, lambda s: s.scalar(select(Sample.image_sha256).where(Sample.sample_id == a.sample_id))) == \
        sha256_hex(a.image) == sha256_hex(same_image.image)
    assert pipe.blobs.get(sha256_hex(b.image)) == b.image
    assert pipe.handle_batch([sample_msg(b), sample_msg(a)]) == [Outcome.DUPLICATE] * 2  # redelivered later
    assert pipe.counters() == {"stored": 3, "duplicate": 3, "dead_letter": 0, "status": 0, "heartbeat": 0}
    assert pipe.handle_batch([]) == []


def test_a_poison_message_in_a_batch_is_a_dead_letter_and_the_others_are_stored(
        pipe: IngestPipeline, sample_factory: Callable[..., SamplePayload]) -> None:
    good1, good2 = sample_factory(seed=1), sample_factory(seed=2)
    nul = sample_factory(seed=3, model_version="1.2\x00")  # valid by the contract; PostgreSQL text cannot hold it
    topic = TOPICS.station(STATION, "samples")
    outcomes = pipe.handle_batch([sample_msg(good1), (topic, b"\xff{garbage"), sample_msg(nul),
                                  ("not/a/topic", b"{}"), sample_msg(good2)])
    assert outcomes == [Outcome.STORED, Outcome.DEAD_LETTER, Outcome.DEAD_LETTER, Outcome.DEAD_LETTER,
                        Outcome.STORED]
    assert sorted(rows(pipe, lambda s: s.scalars(select(Sample.sample_id)).all())) == sorted(
        [good1.sample_id, good2.sample_id])
    reasons = rows(pipe, lambda s: s.scalars(select(DeadLetter.reason).order_by(DeadLetter.id)).all())
    assert reasons == ["contract", "unstorable", "topic"]


def test_a_message_the_database_refuses_becomes_a_dead_letter_alone(
        pipe: IngestPipeline, sample_factory: Callable[..., SamplePayload], monkeypatch: pytest.MonkeyPatch) -> None:
    """Were a value to pass every check and still be refused (``DataError``), the batch is
    stored message by message and only that message becomes a dead letter."""
    monkeypatch.setattr(pipeline_module, "_unstorable", lambda msg: None)
    big = heartbeat(T1, outbox_depth=2**40)  # beyond PostgreSQL's integer; SQLite holds it
    good = sample_factory(seed=1)
    outcomes = pipe.handle_batch([sample_msg(good), (TOPICS.station(STATION, "heartbeat"), encode(big))])
    postgres = pipe.sessions.kw["bind"].dialect.name == "postgresql"
    assert outcomes == [Outcome.STORED, Outcome.DEAD_LETTER if postgres else Outcome.HEARTBEAT]
    assert count(pipe, Sample) == 1
    if postgres:
        dl = rows(pipe, lambda s: s.scalars(select(DeadLetter)).one())
        assert (dl.reason, "out of range" in dl.detail) == ("rejected", True)


def test_a_database_failure_commits_nothing_and_says_so(
        pipe: IngestPipeline, sample_factory: Callable[..., SamplePayload], monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def down(items: Any, received: Any) -> Any:
        calls.append(len(items))
        raise OperationalError("INSERT", {}, Exception("connection refused"))

    monkeypatch.setattr(pipe, "_commit", down)
    monkeypatch.setattr(pipeline_module.time, "sleep", lambda s: None)
    with pytest.raises(IngestError) as err:
        pipe.handle_batch([sample_msg(sample_factory(seed=1)), ("bad", b"")])
    assert err.value.outcomes == [] and isinstance(err.value.__cause__, OperationalError)
    assert calls == [2, 2, 2]  # the whole batch, db_retries times
    assert pipe.counters()["stored"] == pipe.counters()["dead_letter"] == 0
    monkeypatch.undo()
    assert count(pipe, Sample) == count(pipe, DeadLetter) == 0


# -- the fleet ------------------------------------------------------------------------------------
def status(state: str, ts: float, version: str = "1.2.0", agent: str = "agent-st03") -> tuple[str, bytes]:
    return TOPICS.station(STATION, "status"), encode(
        StatusPayload(agent_id=agent, state=state, model_version=version, ts=ts))  # type: ignore[arg-type]


def heartbeat(ts: float, uptime: float = 10.0, version: str = "1.2.0", agent: str = "agent-st03",
              **kw: Any) -> HeartbeatPayload:
    fields: dict[str, Any] = dict(agent_id=agent, ts=ts, model_version=version, uptime_s=uptime, fps=30.0,
                                  dropped_frames=int(ts) % 100, batch_size=4, latency_p50_ms=20.0,
                                  latency_p99_ms=40.0, outbox_depth=int(ts) % 7, outbox_bytes=0, evicted=0)
    fields.update(kw)
    return HeartbeatPayload(**fields)


def hb(ts: float, uptime: float = 10.0, **kw: Any) -> tuple[str, bytes]:
    return TOPICS.station(STATION, "heartbeat"), encode(heartbeat(ts, uptime, **kw))


def agent(p: IngestPipeline, agent_id: str = "agent-st03") -> dict[str, Any]:
    a = rows(p, lambda s: s.scalars(select(Agent).where(Agent.agent_id == agent_id)).one())

    def ts(v: datetime | None) -> float | None:
        return None if v is None else (v.replace(tzinfo=UTC) if v.tzinfo is None else v).timestamp()

    return {"state": a.state, "status_ts": ts(a.status_ts), "heartbeat_ts": ts(a.heartbeat_ts),
            "last_seen": ts(a.last_seen), "model_version": a.model_version, "uptime_s": a.uptime_s,
            "dropped_frames": a.dropped_frames}


def feed(p: IngestPipeline, messages: list[tuple[str, bytes]], one_batch: bool) -> None:
    if one_batch:
        p.handle_batch(messages)
    else:
        for m in messages:
            p.handle(*m)


@pytest.mark.parametrize("one_batch", [False, True], ids=["one by one", "one batch"])
def test_a_will_marks_the_agent_offline_but_keeps_its_newer_heartbeat(pipe: IngestPipeline, one_batch: bool) -> None:
    # the will's ts is when the uplink started: before the run's online status and heartbeats
    feed(pipe, [status("online", T1), hb(T1 + 10, uptime=10.5), hb(T1 + 20, uptime=20.5),
                status("offline", T1 - 0.5)], one_batch)
    assert agent(pipe) == {"state": "offline", "status_ts": T1, "heartbeat_ts": T1 + 20, "last_seen": T1 + 20,
                           "model_version": "1.2.0", "uptime_s": 20.5, "dropped_frames": int(T1 + 20) % 100}
    feed(pipe, [status("online", T1), hb(T1 + 10, uptime=10.5)], one_batch)  # late copies of that run
    assert agent(pipe)["state"] == "offline" and agent(pipe)["heartbeat_ts"] == T1 + 20
    pipe.handle(*hb(T1 + 100, uptime=3.0))  # a heartbeat newer than anything: a new run is up
    assert agent(pipe)["state"] == "online" and agent(pipe)["last_seen"] == T1 + 100
    assert pipe.counters()["status"] == 3 and pipe.counters()["heartbeat"] == 4


def test_an_offline_from_an_earlier_run_does_not_hide_the_new_run(pipe: IngestPipeline) -> None:
    """A lagging worker handles run 1's will after run 2's messages (every worker sees them all)."""
    run2 = T1 + 3600
    for m in (status("online", run2, version="1.3.0"), hb(run2 + 5, uptime=5.2, version="1.3.0"),
              status("offline", T1 - 0.5, version="1.2.0"), status("online", T1, version="1.2.0")):
        pipe.handle(*m)
    assert agent(pipe) == {"state": "online", "status_ts": run2, "heartbeat_ts": run2 + 5, "last_seen": run2 + 5,
                           "model_version": "1.3.0", "uptime_s": 5.2, "dropped_frames": int(run2 + 5) % 100}


def test_older_messages_never_overwrite_newer_figures(pipe: IngestPipeline) -> None:
    pipe.handle(*hb(T1 + 20, uptime=20.0, version="1.3.0"))
    assert agent(pipe)["state"] == "online" and agent(pipe)["status_ts"] is None  # a heartbeat alone: online
    pipe.handle(*hb(T1 + 10, uptime=10.0, version="1.2.0"))  # an older heartbeat, late
    pipe.handle(*status("online", T1, version="1.2.0"))  # an older status: only the status part moves
    assert agent(pipe) == {"state": "online", "status_ts": T1, "heartbeat_ts": T1 + 20, "last_seen": T1 + 20,
                           "model_version": "1.3.0", "uptime_s": 20.0, "dropped_frames": int(T1 + 20) % 100}
    pipe.handle(*status("offline", T1 + 30, version="1.3.0"))  # a clean stop: after everything
    assert agent(pipe)["state"] == "offline" and agent(pipe)["last_seen"] == T1 + 30
    pipe.handle(*status("online", T1 + 25))  # an online older than the stop, late
    assert agent(pipe)["state"] == "offline"


def test_each_agent_has_its_own_row(pipe: IngestPipeline) -> None:
    pipe.handle_batch([status("online", T1, agent="a1"), status("online", T1, agent="a2"),
                       status("offline", T1 + 1, agent="a2"), hb(T1 + 2, agent="a1")])
    assert (agent(pipe, "a1")["state"], agent(pipe, "a2")["state"]) == ("online", "offline")
    assert count(pipe, Agent) == 2


def test_the_fleet_mode_follows_the_newest_heartbeat(pipe: IngestPipeline) -> None:
    from hub.fleet import fleet_runs_split

    def split_fleet() -> bool | None:
        return rows(pipe, lambda s: fleet_runs_split(s, now=datetime.fromtimestamp(T1 + 100, UTC)))

    assert split_fleet() is None  # no agent heard from
    pipe.handle_batch([hb(T1 + 10, agent="a1", mode="full"), hb(T1 + 10, agent="a2", mode="full")])
    assert split_fleet() is False
    pipe.handle(*hb(T1 + 20, agent="a2", mode="auto"))
    pipe.handle(*hb(T1 + 15, agent="a2", mode="full"))  # older, late: does not undo the newer mode
    assert rows(pipe, lambda s: s.scalars(select(Agent.mode).where(Agent.agent_id == "a2")).one()) == "auto"
    assert split_fleet() is True
    pipe.handle(*hb(T1 + 30, agent="a3"))  # an agent older than the field: its mode is unknown
    pipe.handle(*hb(T1 + 31, agent="a2", mode="full"))
    assert split_fleet() is None
    assert rows(pipe, lambda s: fleet_runs_split(s, now=datetime.fromtimestamp(T1 + 100 + 31 * 86400, UTC))) is None
