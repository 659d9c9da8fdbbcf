"""Canary health: the agents running a canary version against those running production (issue 6).

Groups are read from what the agents report (``agents.model_version`` from their heartbeats), not
from the plan, so a canary station that never updated counts as control. Over the window since the
canary started, per group: agents and agents online, defect samples per agent-hour (samples the
hub received that name that version), the mean top score of those samples, the mean of the
agents' latest p99 latency and their dropped frames. :func:`verdict` applies
:class:`CanaryRule`: ``rollback`` as soon as a check fails with enough data, ``promote`` when the
window is over and every check passed, else ``wait``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from hub.tables import Agent, Sample

__all__ = ["CanaryRule", "GroupHealth", "Verdict", "group_health", "verdict"]


@dataclass(frozen=True)
class CanaryRule:
    window_min: float = 60.0
    min_agents: int = 1  # canary agents reporting the version before anything is decided
    min_samples: int = 20  # samples of both groups before the sample checks count
    rate_ratio: tuple[float, float] = (0.5, 2.0)  # canary / control defect-sample rate
    max_score_drop: float = 0.10  # mean top score of the canary's samples below control's
    max_latency_ratio: float = 1.5
    max_dropped_ratio: float = 2.0  # dropped frames per agent, canary / control (control + 1)
    offline_after_s: float = 120.0


@dataclass
class GroupHealth:
    version: str
    agents: int = 0
    online: int = 0
    samples: int = 0
    samples_per_agent_hour: float = 0.0
    mean_score: float | None = None
    latency_p99_ms: float | None = None
    dropped_frames_per_agent: float = 0.0


@dataclass
class Verdict:
    decision: str  # promote | rollback | wait
    reasons: list[str]
    canary: GroupHealth
    control: GroupHealth
    checks: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _aware(t: datetime | None, like: datetime) -> datetime | None:
    if t is None or t.tzinfo is not None or like.tzinfo is None:
        return t
    return t.replace(tzinfo=like.tzinfo)  # SQLite returns naive datetimes


def group_health(s: Session, version: str, since: datetime, now: datetime, rule: CanaryRule) -> GroupHealth:
    g = GroupHealth(version)
    agents = list(s.scalars(select(Agent).where(Agent.model_version == version)))
    g.agents = len(agents)
    g.online = sum(1 for a in agents if a.state == "online"
                   and (now - (_aware(a.last_seen, now) or now)).total_seconds() <= rule.offline_after_s)
    n, mean = s.execute(select(func.count(Sample.id), func.avg(Sample.max_score))
                        .where(Sample.model_version == version, Sample.received_at >= since)).one()
    g.samples, g.mean_score = int(n), (float(mean) if mean is not None else None)
    hours = max((now - since).total_seconds() / 3600, 1e-9)
    g.samples_per_agent_hour = g.samples / max(g.agents, 1) / hours
    if agents:
        g.latency_p99_ms = sum(a.latency_p99_ms for a in agents) / len(agents)
        g.dropped_frames_per_agent = sum(a.dropped_frames for a in agents) / len(agents)
    return g


def verdict(s: Session, canary_version: str, production_version: str, since: datetime, now: datetime,
            rule: CanaryRule | None = None) -> Verdict:
    rule = rule or CanaryRule()
    can = group_health(s, canary_version, since, now, rule)
    ctl = group_health(s, production_version, since, now, rule)
    checks: list[dict[str, Any]] = []
    fails: list[str] = []

    def check(name: str, ok: bool, detail: str) -> None:
        checks.append({"check": name, "ok": ok, "detail": detail})
        if not ok:
            fails.append(f"{name}: {detail}")

    enough = can.samples >= rule.min_samples and ctl.samples >= rule.min_samples
    if can.agents >= rule.min_agents:
        check("agents online", can.online == can.agents, f"{can.online} of {can.agents} canary agents online")
        if ctl.latency_p99_ms and can.latency_p99_ms is not None:
            ratio = can.latency_p99_ms / ctl.latency_p99_ms
            check("latency", ratio <= rule.max_latency_ratio,
                  f"p99 {can.latency_p99_ms:.1f} ms vs control {ctl.latency_p99_ms:.1f} ms ({ratio:.2f}x)")
        ratio = can.dropped_frames_per_agent / (ctl.dropped_frames_per_agent + 1)
        check("dropped frames", ratio <= rule.max_dropped_ratio,
              f"{can.dropped_frames_per_agent:.0f} per agent vs control {ctl.dropped_frames_per_agent:.0f}")
        if enough:
            if ctl.samples_per_agent_hour == 0:
                r = 1.0 if can.samples_per_agent_hour == 0 else math.inf  # no defects either side: equal
            else:
                r = can.samples_per_agent_hour / ctl.samples_per_agent_hour
            lo, hi = rule.rate_ratio
            check("detection rate", lo <= r <= hi,
                  f"{can.samples_per_agent_hour:.1f} vs {ctl.samples_per_agent_hour:.1f} samples per agent-hour "
                  f"({r:.2f}x; allowed {lo}-{hi})")
            if can.mean_score is not None and ctl.mean_score is not None:
                check("score distribution", can.mean_score >= ctl.mean_score - rule.max_score_drop,
                      f"mean top score {can.mean_score:.3f} vs control {ctl.mean_score:.3f}")
    if fails:
        return Verdict("rollback", fails, can, ctl, checks)
    over = now - since >= timedelta(minutes=rule.window_min)
    if can.agents < rule.min_agents:
        return Verdict("wait", [f"{can.agents} canary agents report {canary_version}; need {rule.min_agents}"],
                       can, ctl, checks)
    if not over:
        left = math.ceil((since + timedelta(minutes=rule.window_min) - now).total_seconds() / 60)
        return Verdict("wait", [f"window: {left} min left"], can, ctl, checks)
    if not enough:
        return Verdict("wait", [f"samples: canary {can.samples}, control {ctl.samples}; need {rule.min_samples} "
                                f"each"], can, ctl, checks)
    return Verdict("promote", [], can, ctl, checks)
