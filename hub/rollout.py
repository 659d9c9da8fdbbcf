"""Telling stations which model to run (issue 6): retained ``model`` announcements.

:func:`announce` publishes one :class:`~lineguard_contract.ModelAnnouncePayload` per station on the
station's ``model`` topic, retained, so that an agent that is offline now gets it when it
reconnects. The announcement names the registry version, its manifest's SHA-256 and where the
files are (``<public_url>/api/v1/bundles/<version>/``, served by ``hub/api/routes/bundles.py``
with HTTP ``Range`` for resumable downloads). Only a version the registry holds and has not
rejected is announced; a version older than a station's runs only if ``pinned`` (an admin's
rollback), which the agent checks too.

The staged rollout: :func:`start_canary` marks a candidate ``canary`` and announces it to a
share of the stations (chosen by a hash of version and station, so the same share picks the same
stations) or to a list; :func:`decide_canary` compares canary and control health
(:mod:`hub.canary`) and :func:`promote` (announce to every station) or :func:`rollback` (the
production version announced back, pinned, to every station the version was announced to, as
recorded in ``model_announcements``, and every station whose agent reports running it) carries
out the verdict. ``serve`` runs :class:`RolloutWatcher` to do this automatically.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Literal

from sqlalchemy import select
from sqlalchemy.orm import Session

from hub.canary import CanaryRule, Verdict, verdict
from hub.registry import RegistryError, get, production, set_status
from hub.tables import Agent, ModelAnnouncement, ModelEvent, ModelVersion, Station
from lineguard_contract import ModelAnnouncePayload, StationId, Topics, encode

__all__ = ["RolloutError", "all_stations", "announce", "bundle_base_url", "canary_since", "choose_canary",
           "decide_canary", "promote", "rollback", "start_canary"]

Publish = Callable[[str, bytes], None]


class RolloutError(ValueError):
    """An announcement the rules refuse; the message says which rule."""


def bundle_base_url(public_url: str, version: str) -> str:
    return f"{public_url.rstrip('/')}/api/v1/bundles/{version}/"


def all_stations(s: Session) -> list[StationId]:
    """Every station the hub has heard from."""
    return [StationId(r.site, r.line, r.station) for r in s.scalars(select(Station).order_by(Station.id))]


def announce(s: Session, publish: Publish, version: str, stations: Sequence[StationId], *, public_url: str,
             stage: Literal["canary", "production", "rollback"], pinned: bool = False,
             topics: Topics | None = None) -> ModelAnnouncePayload:
    """Publish ``version`` to ``stations``; returns the payload sent."""
    try:
        info = get(s, version)
    except RegistryError as e:
        raise RolloutError(str(e)) from None
    if info.status == "rejected":
        raise RolloutError(f"version {version} was rejected; it is never announced")
    if not stations:
        raise RolloutError("no stations to announce to")
    payload = ModelAnnouncePayload(version=version, manifest_sha256=info.manifest_sha256,
                                   base_url=bundle_base_url(public_url, version), pinned=pinned, stage=stage,
                                   ts=time.time())
    model_id = s.execute(select(ModelVersion.id).where(ModelVersion.version == version)).scalar_one()
    told = datetime.fromtimestamp(payload.ts, UTC)
    s.add_all([ModelAnnouncement(model_id=model_id, site=sid.site, line=sid.line, station=sid.station, stage=stage,
                                 pinned=pinned, created_at=told) for sid in stations])
    s.flush()
    t = topics or Topics()
    data = encode(payload)
    for sid in stations:
        publish(t.station(sid, "model"), data)
    return payload


def choose_canary(stations: Sequence[StationId], version: str, share: float) -> list[StationId]:
    """``ceil(share * n)`` stations (at least one), the same ones for the same version and share."""
    if not 0 < share <= 1:
        raise RolloutError(f"canary share must be in (0, 1], got {share}")
    key = lambda sid: hashlib.sha256(f"{version}/{sid.site}/{sid.line}/{sid.station}".encode()).hexdigest()  # noqa: E731
    ranked = sorted(stations, key=key)
    return ranked[: max(1, math.ceil(share * len(ranked)))]


def start_canary(s: Session, publish: Publish, version: str, *, public_url: str, actor: str,
                 share: float | None = None, stations: Sequence[StationId] | None = None) -> list[StationId]:
    """Mark ``version`` canary and announce it to ``stations`` or to a ``share`` of all stations."""
    if (share is None) == (stations is None):
        raise RolloutError("give a canary share or a station list (one of them)")
    chosen = list(stations) if stations is not None else choose_canary(all_stations(s), version, share or 0)
    try:
        set_status(s, version, "canary", actor=actor,
                   reason="canary on " + ", ".join(f"{c.site}/{c.line}/{c.station}" for c in chosen))
    except RegistryError as e:
        raise RolloutError(str(e)) from None
    announce(s, publish, version, chosen, public_url=public_url, stage="canary")
    return chosen


def canary_since(s: Session, version: str) -> datetime:
    row = s.execute(select(ModelEvent.created_at).join(ModelVersion, ModelEvent.model_id == ModelVersion.id)
                    .where(ModelVersion.version == version, ModelEvent.status_after == "canary")
                    .order_by(ModelEvent.created_at.desc())).first()
    if row is None:
        raise RolloutError(f"version {version} never went to canary")
    t: datetime = row[0]
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def decide_canary(s: Session, version: str, rule: CanaryRule | None = None, now: datetime | None = None) -> Verdict:
    prod = production(s)
    if prod is None:
        raise RolloutError("no production version to compare the canary with")
    if get(s, version).status != "canary":
        raise RolloutError(f"version {version} is not in canary")
    return verdict(s, version, prod.version, canary_since(s, version), now or datetime.now(UTC), rule)


def promote(s: Session, publish: Publish, version: str, *, public_url: str, actor: str, reason: str) -> int:
    """Make ``version`` production and announce it to every station; returns how many."""
    stations = all_stations(s)
    set_status(s, version, "production", actor=actor, reason=reason)
    if stations:
        announce(s, publish, version, stations, public_url=public_url, stage="production")
    return len(stations)


def rollback(s: Session, publish: Publish, version: str, *, public_url: str, actor: str, reason: str) -> int:
    """Reject ``version`` and announce production back (pinned) to the stations running or told it."""
    prod = production(s)
    if prod is None:
        raise RolloutError("no production version to roll back to")
    took = {(a.station.site, a.station.line, a.station.station)
            for a in s.scalars(select(Agent).where(Agent.model_version == version))}
    took |= {(r.site, r.line, r.station) for r in s.execute(  # told it, whether or not they report it yet
        select(ModelAnnouncement.site, ModelAnnouncement.line, ModelAnnouncement.station)
        .join(ModelVersion, ModelAnnouncement.model_id == ModelVersion.id).where(ModelVersion.version == version))}
    set_status(s, version, "rejected", actor=actor, reason=reason)
    stations = [StationId(*t) for t in sorted(took)]
    if stations:
        announce(s, publish, prod.version, stations, public_url=public_url, stage="rollback", pinned=True)
    return len(stations)
