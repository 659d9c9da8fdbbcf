"""Hub configuration, the blob store, and the ingest pipeline driven directly (no broker),
including two pipelines racing on the same sample ids."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import func, select

from hub.blobs import FileBlobStore, sha256_hex
from hub.core.config import ConfigError, build_config, load_config
from hub.core.db import make_engine, make_session_factory, upgrade
from hub.pipeline import IngestPipeline, Outcome
from hub.tables import Detection, Sample, Station
from lineguard_contract import SamplePayload, Topics, encode

TOPICS = Topics()


def test_config_defaults(tmp_path: Path) -> None:
    c = build_config({"data_dir": str(tmp_path)})
    assert c.db_url == f"sqlite:///{tmp_path / 'hub.sqlite3'}"
    assert c.mqtt.shared_group == "lineguard-hub"
    assert (c.mqtt.host, c.mqtt.port, c.mqtt.tls) == ("127.0.0.1", 1883, False)
    assert build_config({"mqtt": {"url": "mqtts://broker.plant"}}).mqtt.port == 8883


@pytest.mark.parametrize("data, key", [
    ({"databse_url": "sqlite://"}, "databse_url: unknown key"),
    ({"mqtt": {"url": "http://x"}}, "mqtt.url: must look like"),
    ({"mqtt": {"shared_group": "a/b"}}, "mqtt.shared_group"),
    ({"mqtt": {"pasword_env": "X"}}, "mqtt.pasword_env: unknown key"),
    ({"database_url": "not a url"}, "database_url: not a database URL"),
    ({"max_payload_bytes": 10}, "max_payload_bytes"),
    ({"http": {"port": 0}}, "http.port"),
    ({"http": {"cookie_secure": "maybe"}}, "http.cookie_secure"),
    ({"production": True}, "embedded broker has no authentication"),
    ({"heads": {}}, "heads.bundles"),
    ({"heads": {"bundles": []}}, "heads.bundles"),
    ({"heads": {"bundles": ["b"], "max_batch": 0}}, "heads.max_batch"),
    ({"heads": {"bundles": ["b"], "max_dealy_ms": 5}}, "heads.max_dealy_ms: unknown key"),
])
def test_config_errors_name_the_key(data: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build_config(data)


@pytest.mark.parametrize("data, embedded", [
    ({}, True),  # nothing configured: the demo's embedded broker
    ({"mqtt": {"url": "mqtt://b:1883"}}, False),
    ({"mqtt": {"url": "mqtt://127.0.0.1:18830"}, "embedded_broker": True}, True),
])
def test_embedded_broker_only_when_no_broker_is_configured(data: dict[str, object], embedded: bool) -> None:
    assert build_config(data).embedded_broker is embedded


def test_the_deployed_hub_config_is_valid() -> None:
    c = load_config(Path(__file__).resolve().parents[2] / "deploy" / "hub" / "hub.yaml")
    assert c.production and not c.embedded_broker and c.mqtt.tls and c.http.cookie_secure
    assert c.db_url.startswith("postgresql://")


def test_load_config_reads_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "hub.yaml"
    f.write_text("mqtt:\n  url: mqtt://b:1884\n  username: hub\n  password_env: HUB_PW\n")
    monkeypatch.setenv("HUB_PW", "s3cret")
    c = load_config(f)
    assert (c.mqtt.port, c.mqtt.username, c.mqtt.password()) == (1884, "hub", "s3cret")
    f.write_text("- a list\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(f)


def test_file_blob_store(tmp_path: Path) -> None:
    store = FileBlobStore(tmp_path / "blobs")
    data = b"\xff\xd8\xff" + bytes(100)
    sha = store.put(data)
    assert sha == sha256_hex(data) and store.exists(sha) and store.get(sha) == data
    assert store.path(sha) == tmp_path / "blobs" / sha[:2] / sha[2:4] / f"{sha}.jpg"
    mtime = store.path(sha).stat().st_mtime_ns
    assert store.put(data) == sha and store.path(sha).stat().st_mtime_ns == mtime  # idempotent: not rewritten
    assert [p.name for p in store.path(sha).parent.iterdir()] == [f"{sha}.jpg"]  # no temporary files left
    missing = "0" * 64
    assert not store.exists(missing)
    with pytest.raises(KeyError):
        store.get(missing)
    with pytest.raises(ValueError, match="not a SHA-256"):
        store.get("../../etc/passwd")


def test_racing_pipelines_store_each_sample_once(
        db_url: str, tmp_path: Path, sample_factory: Callable[..., SamplePayload]) -> None:
    """Two pipelines (two workers' worth of engines) ingest the same samples at the same time."""
    upgrade(db_url)
    engines = [make_engine(db_url) for _ in range(2)]
    pipes = [IngestPipeline(make_session_factory(e), FileBlobStore(tmp_path / "blobs")) for e in engines]
    samples = [sample_factory(seed=i, n_dets=2) for i in range(12)]
    outcomes: list[Outcome] = []
    barrier = threading.Barrier(2)

    def run(pipe: IngestPipeline) -> None:
        for p in samples:
            barrier.wait()
            outcomes.append(pipe.handle(TOPICS.station(p.station_id, "samples"), encode(p)))

    threads = [threading.Thread(target=run, args=(p,)) for p in pipes]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert sorted(o.value for o in outcomes) == ["duplicate"] * 12 + ["stored"] * 12
        with make_session_factory(engines[0])() as s:
            assert s.scalar(select(func.count()).select_from(Sample)) == 12
            assert s.scalar(select(func.count()).select_from(Detection)) == 24
            assert s.scalar(select(func.count()).select_from(Station)) == 1
    finally:
        for e in engines:
            e.dispose()


def test_pipeline_never_raises_on_bad_input(db_url: str, tmp_path: Path) -> None:
    upgrade(db_url)
    engine = make_engine(db_url)
    pipe = IngestPipeline(make_session_factory(engine), FileBlobStore(tmp_path / "blobs"))
    topic = TOPICS.all_stations("samples").replace("+", "s")
    try:
        for payload in (b"", b"\x00\xff\xfe", b"null", b'{"schema_version": 2}', "é".encode() * 10, b"{" * 5000):
            assert pipe.handle(topic, payload) is Outcome.DEAD_LETTER
        assert pipe.handle("lineguard/v1/a/b/c/results", b"{}") is Outcome.DEAD_LETTER
        assert pipe.counters()["dead_letter"] == 7
    finally:
        engine.dispose()


@pytest.mark.parametrize("immediate,fails", [(False, True), (True, False)])
def test_sqlite_read_then_write_beside_another_writer(tmp_path: Path, immediate: bool, fails: bool) -> None:
    """Why the web app's sessions are ``immediate``: a deferred SQLite transaction that has read,
    and then sees another connection commit, cannot write ("database is locked", at once)."""
    from sqlalchemy.exc import OperationalError

    from hub.tables import DefectClass

    engine = make_engine(f"sqlite:///{tmp_path / 'hub.sqlite3'}")
    upgrade(engine)
    other = make_session_factory(engine)
    web = make_session_factory(engine, immediate=immediate)
    stamp = datetime.now(UTC)
    try:
        with web() as s:
            s.scalar(select(func.count()).select_from(DefectClass))  # the request reads first
            def ingest() -> None:
                with other.begin() as o:
                    o.add(DefectClass(name="from-ingest", created_at=stamp, created_by="ingest"))

            writer = threading.Thread(target=ingest)
            writer.start()
            writer.join(0.5)  # deferred: it commits now; immediate: it waits for our write lock
            assert writer.is_alive() is immediate
            s.add(DefectClass(name="from-request", created_at=stamp, created_by="web"))
            if fails:
                with pytest.raises(OperationalError, match="locked"):
                    s.commit()
            else:
                s.commit()
            writer.join(10)
        with other() as o:
            names = set(o.scalars(select(DefectClass.name)))
        assert names == ({"from-ingest"} if fails else {"from-ingest", "from-request"})
    finally:
        engine.dispose()
