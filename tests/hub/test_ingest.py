"""The ingest worker against a real Mosquitto (tests/conftest.py) and a real database: SQLite
always, PostgreSQL too when TEST_DATABASE_URL is set (tests/hub/conftest.py)."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import func, inspect, select
from sqlalchemy.orm import Session

from hub.blobs import FileBlobStore, sha256_hex
from hub.core.config import HubConfig
from hub.core.db import make_engine, upgrade
from hub.ingest import IngestWorker, shared_filter
from hub.pipeline import IngestError, Outcome
from hub.tables import Agent, Base, DeadLetter, Detection, Sample, Station
from lineguard_contract import SamplePayload, StationId, Topics, encode

TOPICS = Topics()
STATION = StationId("plant1", "lineA", "st03")
SAMPLES_TOPIC = TOPICS.station(STATION, "samples")


def wait_until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


@pytest.fixture
def workers() -> Iterator[Callable[..., IngestWorker]]:
    """``start(config, client_id="hub-w1") -> IngestWorker``, started and subscribed; stopped at teardown."""
    made: list[IngestWorker] = []

    def start(config: HubConfig, client_id: str = "hub-w1") -> IngestWorker:
        w = IngestWorker(config, client_id=client_id)
        made.append(w)
        w.start()
        assert w.wait_subscribed(10), "worker did not subscribe"
        return w

    yield start
    for w in made:
        w.stop()


def query(config: HubConfig, fn: Callable[[Session], Any]) -> Any:
    engine = make_engine(config.db_url)
    try:
        with Session(engine) as s:
            return fn(s)
    finally:
        engine.dispose()


def count(config: HubConfig, table: Any) -> int:
    return int(query(config, lambda s: s.scalar(select(func.count()).select_from(table))))


def as_utc(ts: datetime) -> datetime:
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)  # SQLite returns naive UTC


def test_samples_are_stored_once_each_with_detections_and_blobs(
        mosquitto_broker: Any, hub_config: Callable[..., HubConfig], workers: Callable[..., IngestWorker],
        publisher: Any, sample_factory: Callable[..., SamplePayload]) -> None:
    config = hub_config(mosquitto_broker.port)
    worker = workers(config)
    pub = publisher(mosquitto_broker.port)
    other = StationId("plant1", "lineB", "st01")
    sent = [sample_factory(seed=i, n_dets=i % 3) for i in range(8)] + [sample_factory(seed=9, station=other)]
    for p in sent:
        pub.publish(TOPICS.station(p.station_id, "samples"), encode(p))
    wait_until(lambda: worker.counters()["stored"] == len(sent), 15, "all samples stored")

    rows = query(config, lambda s: {r.sample_id: (r, r.station, list(r.detections)) for r in s.scalars(select(Sample))})
    assert set(rows) == {p.sample_id for p in sent}
    blobs = FileBlobStore(config.blob_dir)
    for p in sent:
        row, station, dets = rows[p.sample_id]
        assert (station.site, station.line, station.station) == (p.site, p.line, p.station)
        assert (row.camera, row.model_version, row.reason, row.width, row.height, row.status) == (
            p.camera, p.model_version, p.reason, p.width, p.height, "new")
        assert as_utc(row.capture_ts).timestamp() == pytest.approx(p.capture_ts, abs=1e-3)
        assert [(d.cls, d.score, [d.x1, d.y1, d.x2, d.y2]) for d in dets] == [
            (d.cls, d.score, d.box) for d in p.detections]
        assert row.image_sha256 == sha256_hex(p.image) and row.image_bytes == len(p.image)
        path = blobs.path(row.image_sha256)
        assert path.relative_to(config.data_dir / "blobs").parts[:2] == (row.image_sha256[:2], row.image_sha256[2:4])
        assert blobs.get(row.image_sha256) == p.image
    assert count(config, Station) == 2
    assert count(config, Detection) == sum(len(p.detections) for p in sent)
    assert worker.counters() == {"stored": 9, "duplicate": 0, "dead_letter": 0, "status": 0, "heartbeat": 0,
                                 "errors": 0}


def test_a_redelivered_sample_id_is_stored_once(
        mosquitto_broker: Any, hub_config: Callable[..., HubConfig], workers: Callable[..., IngestWorker],
        publisher: Any, sample_factory: Callable[..., SamplePayload]) -> None:
    config = hub_config(mosquitto_broker.port)
    worker = workers(config)
    pub = publisher(mosquitto_broker.port)
    p = sample_factory(n_dets=2)
    pub.publish(SAMPLES_TOPIC, encode(p))
    pub.publish(SAMPLES_TOPIC, encode(p))
    wait_until(lambda: worker.counters()["duplicate"] == 1, 10, "the duplicate")
    assert worker.counters()["stored"] == 1
    assert count(config, Sample) == 1
    assert count(config, Detection) == 2


def _missing_field(p: SamplePayload) -> bytes:
    d = json.loads(encode(p))
    del d["camera"]
    return json.dumps(d).encode()


@pytest.mark.parametrize("case, topic, make_payload, reason, detail", [
    ("malformed JSON", SAMPLES_TOPIC, lambda p: b'{"schema_version": 1, "sample_id": ', "contract", "not valid JSON"),
    ("missing field", SAMPLES_TOPIC, _missing_field, "contract", "field 'camera': missing"),
    ("oversized", SAMPLES_TOPIC, lambda p: encode(p) + b" " * 70_000, "oversized", "over the 65536 limit"),
    ("empty topic level", "lineguard/v1/plant1//st03/samples", encode, "topic", "not a valid topic level"),
    ("bad topic level", "lineguard/v1/plant1/line A/st03/samples", encode, "topic", "not a valid topic level"),
    ("other station", TOPICS.station(StationId("plant1", "lineA", "st99"), "samples"), encode, "topic_mismatch",
     "topic from plant1/lineA/st99"),
    ("bad heartbeat", TOPICS.station(STATION, "heartbeat"), lambda p: b"[]", "contract", "not a JSON object"),
])
def test_bad_messages_become_dead_letters_and_ingest_goes_on(
        mosquitto_broker: Any, hub_config: Callable[..., HubConfig], workers: Callable[..., IngestWorker],
        publisher: Any, sample_factory: Callable[..., SamplePayload],
        case: str, topic: str, make_payload: Callable[[SamplePayload], bytes], reason: str, detail: str) -> None:
    config = hub_config(mosquitto_broker.port, max_payload_bytes=65_536)
    worker = workers(config)
    pub = publisher(mosquitto_broker.port)
    bad = make_payload(sample_factory(seed=1))
    pub.publish(topic, bad)
    good = sample_factory(seed=2)
    pub.publish(SAMPLES_TOPIC, encode(good))
    wait_until(lambda: worker.counters()["stored"] == 1, 10, "the good sample after the bad one")
    assert worker.counters()["dead_letter"] == 1 and worker.counters()["errors"] == 0, case
    dl = query(config, lambda s: s.scalars(select(DeadLetter)).one())
    assert (dl.topic, dl.reason, dl.payload_size, dl.payload_sha256) == (topic, reason, len(bad), sha256_hex(bad))
    assert detail in dl.detail, dl.detail
    assert dl.payload_excerpt == bad[:512].decode("utf-8", "backslashreplace")
    assert query(config, lambda s: s.scalars(select(Sample.sample_id)).all()) == [good.sample_id]


def test_two_workers_in_one_shared_group_split_the_load(
        mosquitto_broker: Any, hub_config: Callable[..., HubConfig], workers: Callable[..., IngestWorker],
        publisher: Any, sample_factory: Callable[..., SamplePayload]) -> None:
    config = hub_config(mosquitto_broker.port)
    w1, w2 = workers(config, "hub-w1"), workers(config, "hub-w2")
    assert w1.subscriptions[0][0] == shared_filter("lineguard-hub", TOPICS.all_stations("samples"))
    pub = publisher(mosquitto_broker.port)
    stations = [StationId("plant1", f"line{i % 2}", f"st{i % 3}") for i in range(6)]  # racing station inserts
    sent = [sample_factory(seed=i, station=stations[i % 6]) for i in range(40)]
    for p in sent:
        pub.publish(TOPICS.station(p.station_id, "samples"), encode(p))
    total = lambda: w1.counters()["stored"] + w2.counters()["stored"]  # noqa: E731
    wait_until(lambda: total() == len(sent), 20, "all samples stored by the two workers")
    assert w1.counters()["stored"] > 0 and w2.counters()["stored"] > 0, "the group did not split the load"
    assert w1.counters()["duplicate"] + w2.counters()["duplicate"] == 0
    ids = query(config, lambda s: s.scalars(select(Sample.sample_id)).all())
    assert sorted(ids) == sorted(p.sample_id for p in sent)
    assert count(config, Station) == len({(s.site, s.line, s.station) for s in stations})


def test_migrations_create_the_tables_and_are_idempotent(db_url: str) -> None:
    upgrade(db_url)
    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            insp = inspect(conn)
            assert {"stations", "samples", "detections", "dead_letters", "alembic_version"} <= set(
                insp.get_table_names())
            assert {"sample_id"} in [set(u["column_names"]) for u in insp.get_unique_constraints("samples")]
            assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []  # migrations == tables
            version = conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar_one()
        upgrade(db_url)  # at head: nothing to do
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar_one() == version
    finally:
        engine.dispose()


def test_a_message_is_acknowledged_only_after_commit(
        mosquitto_broker: Any, hub_config: Callable[..., HubConfig], workers: Callable[..., IngestWorker],
        publisher: Any, sample_factory: Callable[..., SamplePayload], monkeypatch: pytest.MonkeyPatch) -> None:
    config = hub_config(mosquitto_broker.port)
    first = workers(config, "hub-w1")

    def database_down(messages: Any) -> Any:
        raise IngestError([])

    monkeypatch.setattr(first.pipeline, "handle_batch", database_down)
    p = sample_factory()
    publisher(mosquitto_broker.port).publish(SAMPLES_TOPIC, encode(p))
    wait_until(lambda: first.counters()["errors"] == 1, 10, "the failed ingest")
    first.stop()  # never acknowledged: the broker keeps the message in the session
    second = workers(config, "hub-w1")  # same client id: the same persistent session
    wait_until(lambda: second.counters()["stored"] == 1, 10, "the redelivered sample")
    assert query(config, lambda s: s.scalars(select(Sample.sample_id)).all()) == [p.sample_id]


@pytest.fixture(params=["mosquitto", "embedded"])
def any_broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[int, bool]]:
    """``(port, embedded)``: Debian's Mosquitto, or the hub's embedded broker (rumqttd)."""
    if request.param == "mosquitto":
        yield request.getfixturevalue("mosquitto_broker").port, False
        return
    from hub.broker import EmbeddedBroker

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    with EmbeddedBroker(port=port, workdir=tmp_path / "broker") as broker:
        yield port, True
        assert broker.running, f"the embedded broker died:\n{broker.log_path and broker.log_path.read_text()[-2000:]}"


def test_after_a_database_failure_the_worker_reconnects_and_the_broker_resends(
        any_broker: tuple[int, bool], hub_config: Callable[..., HubConfig], publisher: Any,
        sample_factory: Callable[..., SamplePayload]) -> None:
    """No restart needed: MQTT 3.1.1 resends unacknowledged messages only on a reconnect, which
    the worker makes itself after a failed batch (here the first two batches fail). With the
    embedded broker the worker does not use $share (its router panics on this path)."""
    port, embedded = any_broker
    config = hub_config(port, embedded_broker=embedded)
    worker = IngestWorker(config, client_id="hub-w1", retry_s=0.2)
    real = worker.pipeline.handle_batch
    failures = [2]

    def flaky(messages: Any) -> Any:
        if failures[0]:
            failures[0] -= 1
            raise IngestError([])
        return real(messages)

    worker.pipeline.handle_batch = flaky  # type: ignore[method-assign]
    worker.start()
    try:
        assert worker.wait_subscribed(10)
        pub = publisher(port)
        sent = [sample_factory(seed=i) for i in range(5)]
        for p in sent:
            pub.publish(SAMPLES_TOPIC, encode(p))
        wait_until(lambda: worker.counters()["stored"] == len(sent), 20, "the resent samples")
        assert failures == [0] and worker.counters()["errors"] >= 2 and worker.counters()["duplicate"] == 0
        assert sorted(query(config, lambda s: s.scalars(select(Sample.sample_id)).all())) == sorted(
            p.sample_id for p in sent)
    finally:
        worker.stop()


class FakeClient:
    """Stands in for paho: records acks and reconnects, in order with the pipeline's commits."""

    def __init__(self, events: list[Any]) -> None:
        self.events = events

    def ack(self, mid: int, qos: int) -> None:
        self.events.append(("ack", mid))

    def disconnect(self) -> None:
        self.events.append("disconnect")

    def loop_stop(self) -> None:
        pass

    def connect_async(self, *args: Any) -> None:
        self.events.append("connect")

    def loop_start(self) -> None:
        pass


class FakeMessage:
    def __init__(self, mid: int, topic: str = SAMPLES_TOPIC, payload: bytes = b"{}", qos: int = 1) -> None:
        self.mid, self.topic, self.payload, self.qos = mid, topic, payload, qos


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_batch_is_acknowledged_after_its_commit_in_arrival_order(
        hub_config: Callable[..., HubConfig], monkeypatch: pytest.MonkeyPatch) -> None:
    worker = IngestWorker(hub_config(1883), batch_max=3, batch_ms=50)
    events: list[Any] = []
    worker._client = FakeClient(events)  # type: ignore[assignment]
    committed: list[list[int]] = []

    def handle_batch(messages: list[tuple[str, bytes]]) -> list[Outcome]:
        events.append("commit")
        committed.append([int(p) for _, p in messages])
        if b"13" in [p for _, p in messages]:
            raise IngestError([Outcome.STORED])  # the first of this batch committed, then the database failed
        return [Outcome.STORED] * len(messages)

    monkeypatch.setattr(worker.pipeline, "handle_batch", handle_batch)
    worker._connection = 1
    for mid in (11, 7, 3, 9):  # mids as the broker numbers them: acknowledged as they came, not sorted
        worker._on_message(worker._client, None, FakeMessage(mid, payload=str(mid).encode()))  # type: ignore
    assert worker._ingest(worker._next_batch())  # three at most per batch
    assert worker._ingest(worker._next_batch())
    assert committed == [[11, 7, 3], [9]]
    assert events == ["commit", ("ack", 11), ("ack", 7), ("ack", 3), "commit", ("ack", 9)]

    events.clear()
    for mid in (12, 13, 14):
        worker._on_message(worker._client, None, FakeMessage(mid, payload=str(mid).encode()))  # type: ignore
    assert not worker._ingest(worker._next_batch())
    assert events == ["commit", ("ack", 12)] and worker.counters()["errors"] == 2  # 13 and 14 wait for a resend

    events.clear()
    worker._on_message(worker._client, None, FakeMessage(15, payload=b"15"))  # type: ignore[arg-type]
    worker._connection = 2  # the connection it came on is gone: the broker resends it on the new one
    assert worker._ingest(worker._next_batch())
    assert events == ["commit"]
    worker._reconnect()
    assert events == ["commit", "disconnect", "connect"]
    worker.engine.dispose()


def test_status_and_heartbeat_are_validated_and_kept(
        mosquitto_broker: Any, hub_config: Callable[..., HubConfig], workers: Callable[..., IngestWorker],
        publisher: Any) -> None:
    from lineguard_contract import HeartbeatPayload, StatusPayload

    pub = publisher(mosquitto_broker.port)
    status = StatusPayload(agent_id="agent-st03", state="online", model_version="1.2.0", ts=1767225600.0)
    pub.client.publish(TOPICS.station(STATION, "status"), encode(status), qos=1, retain=True).wait_for_publish(10)
    config = hub_config(mosquitto_broker.port)
    worker = workers(config)  # subscribes after: gets the retained status
    hb = HeartbeatPayload(agent_id="agent-st03", ts=1767225610.0, model_version="1.2.1", uptime_s=10.0, fps=30.0,
                          dropped_frames=3, batch_size=4, latency_p50_ms=20.0, latency_p99_ms=40.0,
                          outbox_depth=7, outbox_bytes=0, evicted=0)
    wait_until(lambda: worker.counters()["status"] == 1, 10, "the retained status")
    pub.publish(TOPICS.station(STATION, "heartbeat"), encode(hb), qos=0)
    wait_until(lambda: worker.counters()["heartbeat"] == 1, 10, "the heartbeat")
    a, st = query(config, lambda s: s.execute(select(Agent, Station).join(Station, Agent.station_id == Station.id))
                  .one())
    assert (st.site, st.line, st.station, a.agent_id) == (STATION.site, STATION.line, STATION.station, "agent-st03")
    assert (a.state, a.model_version, a.fps, a.latency_p99_ms, a.dropped_frames, a.outbox_depth, a.uptime_s) == (
        "online", "1.2.1", 30.0, 40.0, 3, 7, 10.0)
    assert (as_utc(a.status_ts).timestamp(), as_utc(a.heartbeat_ts).timestamp(), as_utc(a.last_seen).timestamp()) == (
        status.ts, hb.ts, hb.ts)
