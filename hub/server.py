"""``lineguard-hub serve``: the embedded broker (when configured), the ingest worker and the
HTTP server (uvicorn) in one process, started in that order and stopped in reverse.

- First admin: when the database has no user, ``LINEGUARD_HUB_ADMIN_PASSWORD`` (and optionally
  ``LINEGUARD_HUB_ADMIN_USER``, default ``admin``) create one. In production mode nothing else
  does; otherwise a ``demo`` admin with a random password is made once, the password kept in
  ``<data_dir>/demo-login.txt`` (mode 0600) and printed at start.
- SIGINT/SIGTERM stop uvicorn; then the worker disconnects and the broker stops.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from hub.accounts import create_user
from hub.api import HubContext, create_app
from hub.blobs import FileBlobStore
from hub.core.config import HubConfig
from hub.core.db import make_engine, make_session_factory, upgrade
from hub.core.security import new_secret
from hub.ingest import IngestWorker
from hub.mqtt import HeadMqttWorker
from hub.tables import User

__all__ = ["ADMIN_PASSWORD_ENV", "ADMIN_USER_ENV", "DemoLogin", "ensure_first_admin", "serve"]

log = logging.getLogger(__name__)
ADMIN_USER_ENV = "LINEGUARD_HUB_ADMIN_USER"
ADMIN_PASSWORD_ENV = "LINEGUARD_HUB_ADMIN_PASSWORD"


@dataclass(frozen=True)
class DemoLogin:
    username: str
    password: str


def _read_demo_login(path: Path) -> DemoLogin | None:
    try:
        user, password = path.read_text().strip().split(":", 1)
    except (OSError, ValueError):
        return None
    return DemoLogin(user, password)


def ensure_first_admin(config: HubConfig, sessions: sessionmaker[Session]) -> DemoLogin | None:
    """Create the first admin if there is no user; the demo login when one is in use."""
    demo_file = config.data_dir / "demo-login.txt"
    with sessions() as s:
        if int(s.scalar(select(func.count()).select_from(User)) or 0) > 0:
            return None if config.production else _read_demo_login(demo_file)
        password = os.environ.get(ADMIN_PASSWORD_ENV)
        if password:
            name = os.environ.get(ADMIN_USER_ENV, "admin")
            create_user(s, name, password, "admin")
            s.commit()
            log.info("created the first admin %r from %s", name, ADMIN_PASSWORD_ENV)
            return None
        if config.production:
            raise SystemExit(f"production mode and no user yet: set {ADMIN_PASSWORD_ENV} (and {ADMIN_USER_ENV}) "
                             "or run `lineguard-hub user add NAME --role admin --password-stdin`")
        login = DemoLogin("demo", new_secret()[:16])
        create_user(s, login.username, login.password, "admin")
        s.commit()
    config.data_dir.mkdir(parents=True, exist_ok=True)
    tmp = demo_file.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, stat.S_IRUSR | stat.S_IWUSR)
    with os.fdopen(fd, "w") as f:
        f.write(f"{login.username}:{login.password}\n")
    os.replace(tmp, demo_file)
    log.warning("no user existed: created the demo admin %r (password in %s); not for production",
                login.username, demo_file)
    return login


class _Server(uvicorn.Server):
    """uvicorn, minus re-raising SIGINT/SIGTERM after its graceful shutdown: serve() finishes the stop."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            yield
            self._captured_signals.clear()


def start_heads(config: HubConfig, client_id: str | None = None) -> HeadMqttWorker:
    """Load every configured split head and start serving features (see hub/head_service.py)."""
    from hub.head_service import HeadService
    from hub.heads import bundles_dir_loader, load_heads

    hc = config.heads
    assert hc is not None
    heads = load_heads(hc.bundles, threads=hc.threads, runtime=hc.runtime, device=hc.device, half=hc.half,
                       max_batch=hc.max_batch)
    bundles_dir = hc.bundles_dir or (config.data_dir / "bundles" if config.retrain is not None else None)
    loader = None if bundles_dir is None else bundles_dir_loader(
        bundles_dir, hc.threads, runtime=hc.runtime, device=hc.device, half=hc.half, max_batch=hc.max_batch)

    def factory(publish: Any) -> HeadService:
        return HeadService(heads, publish, max_batch=hc.max_batch, max_delay_ms=hc.max_delay_ms,
                           dead_letter_dir=config.data_dir / "dead-letter" / "features",
                           dead_letter_keep=hc.dead_letter_keep, loader=loader, keep_idle_s=hc.keep_idle_h * 3600)

    worker = HeadMqttWorker(config.mqtt, factory, group=hc.group, shared=not config.embedded_broker,
                            client_id=client_id or f"{hc.group}-{socket.gethostname()}-{os.getpid()}"[:64])
    worker.start()
    if not worker.wait_subscribed(15):
        log.warning("head service not subscribed yet (broker %s unreachable?); it keeps retrying", config.mqtt.url)
    log.info("head service: bundles %s%s", sorted(heads),
             f"; other versions loaded from {bundles_dir} when asked for" if bundles_dir is not None else "")
    return worker


def serve(config: HubConfig, *, log_level: str = "info") -> int:
    config.data_dir.mkdir(parents=True, exist_ok=True)
    broker = None
    if config.embedded_broker:
        from hub.broker import EmbeddedBroker

        broker = EmbeddedBroker(host=config.mqtt.host, port=config.mqtt.port, workdir=config.data_dir / "broker")
        broker.start()
        log.info("embedded MQTT broker on %s", broker.url)
    engine = make_engine(config.db_url)
    worker: IngestWorker | None = None
    heads: HeadMqttWorker | None = None
    scheduler = None
    watcher = None
    if config.retrain is not None and config.retrain.schedule is not None:
        from hub.retrain_worker import RetrainScheduler

        scheduler = RetrainScheduler(config)
        scheduler.start()
        log.info("retraining scheduled: %s (UTC)", config.retrain.schedule)
    try:
        upgrade(engine)
        sessions = make_session_factory(engine)
        demo = ensure_first_admin(config, sessions)
        blobs = FileBlobStore(config.blob_dir)
        worker = IngestWorker(config, blobs=blobs, migrate=False)
        worker.start()
        if not worker.wait_subscribed(15):
            log.warning("ingest worker not subscribed yet (broker %s unreachable?); it keeps retrying",
                        config.mqtt.url)
        if config.heads is not None:
            heads = start_heads(config)
        if config.rollout is not None and config.rollout.auto:
            from hub.rollout_worker import RolloutWatcher

            watcher = RolloutWatcher(config, make_session_factory(engine, immediate=True))
            watcher.start()
        web_sessions = make_session_factory(engine, immediate=True)  # requests read, then write (SQLite)
        app = create_app(HubContext(config, web_sessions, blobs, ingest_counters=worker.counters,
                                    read_sessions=make_session_factory(engine)))
        url = f"http://{config.http.host}:{config.http.port}/"
        print(f"LineGuard hub: {url}  (MQTT {config.mqtt.url}{', embedded broker' if broker else ''}; "
              f"database {engine.url.render_as_string(hide_password=True)})", flush=True)
        if demo is not None:
            print(f"demo login: {demo.username} / {demo.password}", flush=True)
        server = _Server(uvicorn.Config(app, host=config.http.host, port=config.http.port,
                                               log_level=log_level, access_log=False, lifespan="off"))
        server.run()
    finally:
        if watcher is not None:
            watcher.stop()
        if scheduler is not None:
            scheduler.stop()
        if heads is not None:
            heads.stop()
        if worker is not None:
            worker.stop()
        engine.dispose()
        if broker is not None:
            broker.stop()
    return 0
