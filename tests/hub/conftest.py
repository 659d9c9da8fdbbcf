"""Hub test fixtures: a database URL per backend (SQLite always; PostgreSQL when
``TEST_DATABASE_URL`` is set, each test in a fresh schema dropped afterwards), a hub config
pointing at it, JPEG bytes and sample payloads, and a paho publisher."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from hub.core.config import HubConfig, build_config
from hub.core.db import make_engine, normalize_url
from lineguard_contract import Detection, SamplePayload, StationId, new_sample_id

STATION = StationId("plant1", "lineA", "st03")


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'hub.sqlite3'}"
        return
    base = os.environ.get("TEST_DATABASE_URL")
    if not base:
        pytest.skip("TEST_DATABASE_URL is not set (e.g. postgresql://postgres@127.0.0.1:5432/test)")
    schema = f"hubtest_{uuid.uuid4().hex[:12]}"
    admin = make_engine(base)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    url = normalize_url(base).update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture
def hub_config(db_url: str, tmp_path: Path) -> Callable[..., HubConfig]:
    """``make(port, **overrides) -> HubConfig`` on ``db_url`` with data in ``tmp_path/hub``."""

    def make(port: int, **overrides: Any) -> HubConfig:
        data: dict[str, Any] = {"data_dir": str(tmp_path / "hub"), "database_url": db_url,
                                "mqtt": {"url": f"mqtt://127.0.0.1:{port}"}}
        data.update(overrides)
        return build_config(data)

    return make


def jpeg_bytes(seed: int = 0, size: tuple[int, int] = (48, 64)) -> bytes:
    import cv2
    import numpy as np

    img = np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)
    ok, buf = cv2.imencode(".jpg", img)
    assert ok
    return bytes(buf.tobytes())


def make_sample(seed: int = 0, station: StationId = STATION, n_dets: int = 1, **kw: Any) -> SamplePayload:
    fields: dict[str, Any] = dict(
        sample_id=new_sample_id(), site=station.site, line=station.line, station=station.station, camera="cam0",
        capture_ts=1767225600.125 + seed, model_version="1.2.0", reason="defect" if n_dets else "random_negative",
        width=64, height=48, image=jpeg_bytes(seed),
        detections=[Detection(cls="scratch", score=0.5 + i / 100, box=[1.0 + i, 2.0, 30.0, 40.0])
                    for i in range(n_dets)],
    )
    fields.update(kw)
    return SamplePayload(**fields)


class Publisher:
    """A paho QoS 1 publisher, clean session; ``publish`` waits for the PUBACK."""

    def __init__(self, port: int) -> None:
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        self.connected = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4().hex[:8]}")
        self.client.on_connect = lambda c, u, f, rc, p: self.connected.set()
        self.client.connect("127.0.0.1", port, 30)
        self.client.loop_start()
        assert self.connected.wait(10), "publisher could not connect"

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> None:
        info = self.client.publish(topic, payload, qos=qos)
        info.wait_for_publish(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def publisher() -> Iterator[Callable[[int], Publisher]]:
    made: list[Publisher] = []

    def make(port: int) -> Publisher:
        made.append(Publisher(port))
        return made[-1]

    yield make
    for p in made:
        p.close()



@pytest.fixture
def sample_factory() -> Callable[..., SamplePayload]:
    """``make(seed=0, station=STATION, n_dets=1, **fields) -> SamplePayload`` with a real JPEG."""
    return make_sample


@dataclass
class HubStore:
    """A migrated hub database and blob store, filled through the real ingest pipeline."""

    config: HubConfig
    sessions: Any
    blobs: Any

    def ingest(self, payloads: list[SamplePayload]) -> list[SamplePayload]:
        from hub.pipeline import IngestPipeline
        from lineguard_contract import Topics, encode

        pipeline, topics = IngestPipeline(self.sessions, self.blobs), Topics()
        for p in payloads:
            pipeline.handle(topics.station(p.station_id, "samples"), encode(p))
        return payloads

    def add_users(self, password: str, **roles: str) -> None:
        from hub.accounts import create_user

        with self.sessions.begin() as s:
            for name, role in roles.items():
                create_user(s, name, password, role)


@pytest.fixture
def hub_store(db_url: str, tmp_path: Path) -> Iterator[HubStore]:
    """A :class:`HubStore` on ``db_url`` (SQLite, and PostgreSQL with TEST_DATABASE_URL)."""
    from hub.blobs import FileBlobStore
    from hub.core.db import make_session_factory, upgrade

    config = build_config({"data_dir": str(tmp_path / "hub"), "database_url": db_url,
                           "mqtt": {"url": "mqtt://127.0.0.1:1"}})
    engine = make_engine(config.db_url)
    upgrade(engine)
    yield HubStore(config, make_session_factory(engine), FileBlobStore(config.blob_dir, fsync=False))
    engine.dispose()


def sample_ids_on_sides(below: int, above: int, val_share: float, start: int = 1) -> list[str]:
    """``below`` sample ids whose hash falls under ``val_share`` and ``above`` ids at or over it."""
    from hub.export import _hash

    lo: list[str] = []
    hi: list[str] = []
    k = start
    while len(lo) < below or len(hi) < above:
        sid = str(uuid.UUID(int=k))
        k += 1
        side = lo if _hash(sid) < val_share else hi
        if len(side) < (below if side is lo else above):
            side.append(sid)
    return lo + hi


def reject_samples(hub_store: HubStore, sample_factory: Callable[..., SamplePayload], ids: list[str]) -> None:
    """Ingest a sample (no detections) for each id and review each as rejected (by rita, a reviewer)."""
    from hub.accounts import create_user
    from hub.review import apply_review
    from hub.tables import Sample, User

    hub_store.ingest([sample_factory(seed=i, n_dets=0, sample_id=sid) for i, sid in enumerate(ids)])
    with hub_store.sessions.begin() as s:
        if not s.query(User).filter_by(username="rita").count():
            create_user(s, "rita", "pw-long-enough-1", "reviewer")
        uid = s.query(User).filter_by(username="rita").one().id
        for smp in s.query(Sample).filter(Sample.sample_id.in_(ids)).all():
            apply_review(s, smp, user_id=uid, username="rita", action="reject")


@contextlib.contextmanager
def live_app(app: Any) -> Iterator[str]:
    """``app`` served by uvicorn on a free 127.0.0.1 port in a thread; yields its base URL."""
    import uvicorn

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def hub_app(config: HubConfig, engine: Any, blobs: Any) -> Any:
    """The hub app wired as ``hub.server.serve`` wires it: writes in IMMEDIATE transactions (SQLite),
    GET/HEAD requests on plain read sessions."""
    from hub.api import HubContext, create_app
    from hub.core.db import make_session_factory

    return create_app(HubContext(config, make_session_factory(engine, immediate=True), blobs,
                                 read_sessions=make_session_factory(engine)))
