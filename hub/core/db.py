"""Engines, sessions and migrations.

- ``postgresql://`` URLs are read as ``postgresql+psycopg://`` (psycopg 3 is the driver the
  ``hub`` extra installs).
- SQLite gets ``journal_mode=WAL``, ``foreign_keys=ON`` and a busy timeout on every connection.
  pysqlite's own transaction handling is switched off and SQLAlchemy's ``begin`` emits ``BEGIN``
  itself, so a transaction really spans every statement in it (SELECTs included).
- Tables are created by Alembic migrations (``hub/migrations``), never by ``create_all``:
  :func:`upgrade` runs them to head programmatically; it is a no-op when already at head.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import Session, sessionmaker

__all__ = ["MIGRATIONS_DIR", "make_engine", "make_session_factory", "normalize_url", "upgrade"]

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 10_000
IMMEDIATE = "lineguard_sqlite_immediate"


def normalize_url(url: str | URL) -> URL:
    """The URL with the driver the hub uses: ``postgresql`` -> ``postgresql+psycopg``."""
    u = make_url(url)
    if u.drivername in ("postgresql", "postgres"):
        u = u.set(drivername="postgresql+psycopg")
    return u


def make_engine(url: str | URL, **kwargs: Any) -> Engine:
    """An engine for ``url``; for a file SQLite database the parent directory is created."""
    u = normalize_url(url)
    if u.get_backend_name() == "sqlite":
        if u.database and u.database != ":memory:" and not u.database.startswith("file:"):
            Path(u.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(u, **kwargs)
        _sqlite_setup(engine)
        return engine
    return create_engine(u, pool_pre_ping=True, **kwargs)


def _sqlite_setup(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # no implicit BEGINs from pysqlite: _on_begin emits it
        cur = dbapi_conn.cursor()
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cur.execute("PRAGMA synchronous=NORMAL")  # with WAL: durable at checkpoints, never corrupt
        finally:
            cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get(IMMEDIATE) else "BEGIN")


def make_session_factory(engine: Engine, *, immediate: bool = False) -> sessionmaker[Session]:
    """Sessions on ``engine``. ``immediate``: on SQLite every transaction starts with ``BEGIN
    IMMEDIATE`` (takes the write lock first, waiting up to the busy timeout). Needed where a
    transaction reads and then writes while other processes write: a deferred SQLite transaction
    that read an older snapshot cannot upgrade to a writer and fails at once with "database is
    locked", whatever the busy timeout. The web app uses it; PostgreSQL ignores it."""
    if immediate and engine.dialect.name == "sqlite":
        return sessionmaker(engine.execution_options(**{IMMEDIATE: True}), expire_on_commit=False)
    return sessionmaker(engine, expire_on_commit=False)


def _alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return cfg


def upgrade(url: str | URL | Engine, revision: str = "head") -> None:
    """Run the Alembic migrations on ``url`` (or an engine) up to ``revision``."""
    engine = url if isinstance(url, Engine) else make_engine(url)
    try:
        with engine.begin() as conn:
            cfg = _alembic_config()
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
    finally:
        if not isinstance(url, Engine):
            engine.dispose()
