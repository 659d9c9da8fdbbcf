"""Telling stations which model to run (issue 6): retained ``model`` announcements.

:func:`announce` publishes one :class:`~lineguard_contract.ModelAnnouncePayload` per station on the
station's ``model`` topic, retained, so that an agent that is offline now gets it when it
reconnects. The announcement names the registry version, its manifest's SHA-256 and where the
files are (``<public_url>/api/v1/bundles/<version>/``, served by ``hub/api/routes/bundles.py``
with HTTP ``Range`` for resumable downloads). Only a version the registry holds and has not
rejected is announced; a version older than a station's runs only if ``pinned`` (an admin's
rollback), which the agent checks too.

Not here yet: choosing canary stations by share, comparing canary and control health, and
promoting or rolling back automatically (the staged rollout).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Literal

from sqlalchemy import select
from sqlalchemy.orm import Session

from hub.registry import RegistryError, get
from hub.tables import Station
from lineguard_contract import ModelAnnouncePayload, StationId, Topics, encode

__all__ = ["RolloutError", "all_stations", "announce", "bundle_base_url"]

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
    t = topics or Topics()
    data = encode(payload)
    for sid in stations:
        publish(t.station(sid, "model"), data)
    return payload
