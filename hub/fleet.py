"""What the fleet, models and charts pages show, read from the database.

- :func:`list_agents`: every agent with its station, last status and heartbeat figures. An agent
  whose retained status says online but that has not been heard from for ``stale_after`` is
  shown as ``stale`` (its link or process may be gone before the broker noticed).
- :func:`model_versions`: which model versions the agents run (from their status/heartbeat)
  and how many samples each version sent.
- :func:`defect_series`: defect samples per line per hour or day (model-flagged, and how many
  of those reviewers confirmed). Samples are what agents selected, not every frame inspected,
  so this is a count of defects over time, not a share of parts.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from hub.tables import Agent, Sample, Station

__all__ = ["SPLIT_WINDOW", "AgentView", "SeriesPoint", "defect_series", "fleet_runs_split", "list_agents",
           "model_versions"]

STALE_AFTER = timedelta(seconds=60)
SPLIT_WINDOW = timedelta(days=30)  #: agents heard from within this long count for :func:`fleet_runs_split`


def _utc(ts: datetime | None) -> datetime | None:
    if ts is None:
        return None
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


@dataclass(frozen=True)
class AgentView:
    site: str
    line: str
    station: str
    agent_id: str
    state: str  # online | offline | stale | unknown
    model_version: str
    last_seen: datetime
    fps: float
    latency_p99_ms: float
    dropped_frames: int
    outbox_depth: int
    uptime_s: float
    mode: str | None = None  # full | split | auto, from its heartbeats; None: not reported


def list_agents(s: Session, now: datetime | None = None, stale_after: timedelta = STALE_AFTER) -> list[AgentView]:
    now = now or datetime.now(UTC)
    rows = s.execute(select(Agent, Station).join(Station, Station.id == Agent.station_id)
                     .order_by(Station.site, Station.line, Station.station, Agent.agent_id)).all()
    out = []
    for a, st in rows:
        last_seen = _utc(a.last_seen) or now
        state = a.state
        if state == "online" and now - last_seen > stale_after:
            state = "stale"
        out.append(AgentView(st.site, st.line, st.station, a.agent_id, state, a.model_version, last_seen,
                             a.fps, a.latency_p99_ms, a.dropped_frames, a.outbox_depth, a.uptime_s, a.mode))
    return out


def fleet_runs_split(s: Session, now: datetime | None = None, window: timedelta = SPLIT_WINDOW) -> bool | None:
    """Whether the fleet runs split parts: True when an agent heard from within ``window`` runs
    split mode (``split`` or ``auto``), False when every such agent reported ``full``, None when
    none was heard from or one has not reported its mode (an agent older than the field)."""
    since = (now or datetime.now(UTC)) - window
    modes = set(s.scalars(select(Agent.mode).where(Agent.last_seen >= since)).all())
    if not modes or None in modes:
        return None
    return bool(modes & {"split", "auto"})


def model_versions(s: Session, agents: list[AgentView] | None = None) -> list[dict[str, Any]]:
    """``[{"version", "agents": [station paths], "samples": n}]``, newest version first."""
    agents = agents if agents is not None else list_agents(s)
    counts = dict(s.execute(select(Sample.model_version, func.count()).group_by(Sample.model_version)).all())
    versions: dict[str, dict[str, Any]] = {}
    for v, n in counts.items():
        versions[v] = {"version": v, "agents": [], "samples": int(n)}
    for a in agents:
        if a.model_version:
            entry = versions.setdefault(a.model_version, {"version": a.model_version, "agents": [], "samples": 0})
            entry["agents"].append(f"{a.site}/{a.line}/{a.station} ({a.agent_id}, {a.state})")
    return sorted(versions.values(), key=lambda e: _version_key(e["version"]), reverse=True)


def _version_key(v: str) -> tuple[Any, ...]:
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in v.replace("-", ".").split("."))


@dataclass(frozen=True)
class SeriesPoint:
    line: str  # site/line
    bucket: datetime
    defects: int
    confirmed: int


def _bucket(dialect: str, bucket: str) -> ColumnElement[Any]:
    if dialect == "postgresql":
        return func.date_trunc(bucket, Sample.capture_ts)
    fmt = "%Y-%m-%d %H:00:00" if bucket == "hour" else "%Y-%m-%d 00:00:00"
    return func.strftime(fmt, Sample.capture_ts)


def defect_series(s: Session, since: datetime, bucket: str = "hour") -> list[SeriesPoint]:
    if bucket not in ("hour", "day"):
        raise ValueError("bucket must be 'hour' or 'day'")
    b = _bucket(s.get_bind().dialect.name, bucket).label("b")
    q = (select(Station.site, Station.line, b, func.count(),
                func.sum(case((Sample.status == "confirmed", 1), else_=0)))
         .join(Station, Station.id == Sample.station_id)
         .where(Sample.capture_ts >= since, Sample.reason == "defect")
         .group_by(Station.site, Station.line, b).order_by(b))
    out = []
    for site, line, bk, n, confirmed in s.execute(q).all():
        ts = bk if isinstance(bk, datetime) else datetime.fromisoformat(str(bk))
        out.append(SeriesPoint(f"{site}/{line}", _utc(ts) or ts, int(n), int(confirmed or 0)))
    return out
