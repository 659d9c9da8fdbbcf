"""The fleet's ``agents`` rows: each agent's presence, last contact and health figures, folded from
its status and heartbeat messages as the ingest workers handle them (late, out of order, redelivered)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import ColumnElement, Float, Table, and_, case, cast, func, literal, not_, or_
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from hub.tables import Agent
from lineguard_contract import HeartbeatPayload, StatusPayload

__all__ = ["STALE_RUN_S", "fold_agent_message"]

STALE_RUN_S = 10.0  # an offline this much older than the start of the agent's newest run is from an earlier run
AGENTS: Table = Agent.__table__  # type: ignore[assignment]


def _epoch(s: Session, col: Any) -> ColumnElement[Any]:
    """Seconds since the epoch of a timestamp column, in SQL."""
    if s.get_bind().dialect.name == "sqlite":  # stored as 'YYYY-MM-DD HH:MM:SS.ffffff' in UTC
        return (func.julianday(col) - 2440587.5) * 86400.0
    return cast(func.extract("epoch", col), Float)


def fold_agent_message(s: Session, station_pk: int, msg: StatusPayload | HeartbeatPayload) -> None:
    """Fold one status or heartbeat into its agent's row (``station_id`` + ``agent_id``).

    The fleet page shows per agent: its presence (``state``), when it was last heard from
    (``last_seen``) and its latest health figures. Workers handle messages late and out of order
    (every worker sees every status and heartbeat; redeliveries), so each part is kept from the
    newest message that carries it, and an older message never overwrites newer data:

    - health figures (``heartbeat_ts``, ``fps``, ``latency_p99_ms``, ``dropped_frames``,
      ``outbox_depth``, ``uptime_s``) and the split ``mode`` come from the heartbeat with the greatest ``ts``;
    - ``last_seen`` is the greatest ``ts`` of any status or heartbeat (it never goes back), and
      ``model_version`` comes from that newest message;
    - ``online`` applies when its ``ts`` is after ``status_ts``; a heartbeat newer than
      ``last_seen`` also sets ``online`` (the agent is running: a new run whose online status this
      worker has not seen yet);
    - ``offline`` applies even when its ``ts`` is older than ``status_ts``, because the ``ts`` of a
      will is when the agent's uplink started, not when it was lost: the broker sends the will
      after everything that run sent. An offline is ignored only when it is provably from an
      earlier run: the stored heartbeat shows a run that started (``heartbeat_ts - uptime_s``)
      more than :data:`STALE_RUN_S` after the offline's ``ts``. ``status_ts`` then becomes the
      greatest status ``ts`` seen, so a late copy of that run's ``online`` cannot undo it.

    So a retained will with an old ``ts`` marks the agent offline but leaves its newer heartbeat
    figures and ``last_seen`` as they were: the page shows "offline, last seen <last heartbeat>".
    """
    a = AGENTS.c
    ts = datetime.fromtimestamp(msg.ts, UTC)
    values: dict[str, Any] = {"station_id": station_pk, "agent_id": msg.agent_id, "model_version": msg.model_version,
                              "last_seen": ts}
    if isinstance(msg, StatusPayload):
        values.update(state=msg.state, status_ts=ts)
    else:
        values.update(state="online", heartbeat_ts=ts, fps=msg.fps, latency_p99_ms=msg.latency_p99_ms,
                      dropped_frames=msg.dropped_frames, outbox_depth=msg.outbox_depth, uptime_s=msg.uptime_s,
                      mode=msg.mode)
    mod: Any = sqlite if s.get_bind().dialect.name == "sqlite" else postgresql
    stmt = mod.insert(AGENTS).values(**values)
    ex = stmt.excluded
    newest = ex.last_seen >= a.last_seen
    sets: dict[str, Any] = {"last_seen": case((newest, ex.last_seen), else_=a.last_seen),
                            "model_version": case((newest, ex.model_version), else_=a.model_version)}
    if isinstance(msg, HeartbeatPayload):
        applies = or_(a.heartbeat_ts.is_(None), ex.heartbeat_ts > a.heartbeat_ts)
        for col in ("heartbeat_ts", "fps", "latency_p99_ms", "dropped_frames", "outbox_depth", "uptime_s", "mode"):
            sets[col] = case((applies, getattr(ex, col)), else_=getattr(a, col))
        sets["state"] = case((ex.last_seen > a.last_seen, literal("online")), else_=a.state)
    elif msg.state == "online":
        applies = or_(a.status_ts.is_(None), ex.status_ts > a.status_ts)
        sets["state"] = case((applies, ex.state), else_=a.state)
        sets["status_ts"] = case((applies, ex.status_ts), else_=a.status_ts)
    else:
        stale = and_(a.state == "online", a.heartbeat_ts.is_not(None),
                     _epoch(s, a.heartbeat_ts) - a.uptime_s > msg.ts + STALE_RUN_S)
        later = or_(a.status_ts.is_(None), ex.status_ts > a.status_ts)
        sets["state"] = case((not_(stale), ex.state), else_=a.state)
        sets["status_ts"] = case((and_(not_(stale), later), ex.status_ts), else_=a.status_ts)
    s.execute(stmt.on_conflict_do_update(index_elements=["station_id", "agent_id"], set_=sets))
