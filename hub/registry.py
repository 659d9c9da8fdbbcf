"""The model registry: every bundle version the hub knows, and the rules for changing its status.

Statuses (:data:`hub.tables.MODEL_STATUSES`) and the changes allowed (:data:`TRANSITIONS`)::

    candidate -> canary | production | rejected      (the evaluation gate, or an admin)
    canary    -> production | rejected               (the rollout's verdict, or an admin)
    production -> retired                            (only by promoting another version)
    retired   -> production                          (a manual rollback)

There is at most one ``production`` version: promoting one retires the one before it in the same
transaction. Every change is written to ``model_events`` with who and why.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from hub.tables import MODEL_STATUSES, ModelEvent, ModelVersion
from models.bundle import MANIFEST_FILE, load_bundle

__all__ = ["TRANSITIONS", "ModelInfo", "RegistryError", "get", "list_versions", "production", "register",
           "set_status"]

TRANSITIONS: dict[str, frozenset[str]] = {
    "candidate": frozenset({"canary", "production", "rejected"}),
    "canary": frozenset({"production", "rejected"}),
    "production": frozenset({"retired"}),
    "retired": frozenset({"production"}),
    "rejected": frozenset(),
}
assert set(TRANSITIONS) == set(MODEL_STATUSES)


class RegistryError(ValueError):
    """A registry change that the rules refuse; the message says which rule."""


@dataclass(frozen=True)
class ModelInfo:
    version: str
    parent_version: str | None
    status: str
    bundle_path: str
    manifest_sha256: str
    data_snapshot: list[int]
    metrics: dict[str, Any]
    created_at: datetime
    created_by: str
    promoted_at: datetime | None
    promoted_by: str | None

    @classmethod
    def of(cls, row: ModelVersion) -> ModelInfo:
        return cls(row.version, row.parent_version, row.status, row.bundle_path, row.manifest_sha256,
                   json.loads(row.data_snapshot_json), json.loads(row.metrics_json), row.created_at, row.created_by,
                   row.promoted_at, row.promoted_by)


def _now() -> datetime:
    return datetime.now(UTC)


def register(s: Session, bundle_dir: Path, *, actor: str, data_snapshot: Sequence[int] = (),
             metrics: dict[str, Any] | None = None, status: str = "candidate") -> ModelInfo:
    """Add a bundle (verified against its manifest) as ``status`` (``candidate``, or ``production``
    for the first model of a hub)."""
    bundle = load_bundle(bundle_dir, roles=(), verify=True)
    m = bundle.manifest
    if status not in ("candidate", "production"):
        raise RegistryError(f"a new version starts as candidate (or production for the first), not {status!r}")
    if s.scalar(select(ModelVersion).where(ModelVersion.version == m.version)) is not None:
        raise RegistryError(f"version {m.version} is already registered")
    if status == "production" and production(s) is not None:
        raise RegistryError("there is a production version already: register a candidate and promote it")
    now = _now()
    row = ModelVersion(version=m.version, parent_version=m.parent_version, status=status,
                       bundle_path=str(Path(bundle_dir).resolve()),
                       manifest_sha256=hashlib.sha256((Path(bundle_dir) / MANIFEST_FILE).read_bytes()).hexdigest(),
                       data_snapshot_json=json.dumps(sorted(int(i) for i in data_snapshot)),
                       metrics_json=json.dumps(metrics or m.metrics or {}), created_at=now, created_by=actor,
                       promoted_at=now if status == "production" else None,
                       promoted_by=actor if status == "production" else None)
    s.add(row)
    s.flush()
    s.add(ModelEvent(model_id=row.id, status_before=None, status_after=status, actor=actor, reason="registered",
                     created_at=now))
    s.flush()
    return ModelInfo.of(row)


def _row(s: Session, version: str) -> ModelVersion:
    row = s.scalar(select(ModelVersion).where(ModelVersion.version == version))
    if row is None:
        raise RegistryError(f"no model version {version!r}")
    return row


def get(s: Session, version: str) -> ModelInfo:
    return ModelInfo.of(_row(s, version))


def production(s: Session) -> ModelInfo | None:
    row = s.scalar(select(ModelVersion).where(ModelVersion.status == "production"))
    return ModelInfo.of(row) if row is not None else None


def list_versions(s: Session) -> list[ModelInfo]:
    return [ModelInfo.of(r) for r in s.scalars(select(ModelVersion).order_by(ModelVersion.created_at,
                                                                             ModelVersion.id))]


def set_status(s: Session, version: str, status: str, *, actor: str, reason: str) -> ModelInfo:
    """Change ``version`` to ``status`` if :data:`TRANSITIONS` allows it; promoting to production
    retires the current production version. The caller commits."""
    if status not in MODEL_STATUSES:
        raise RegistryError(f"unknown status {status!r}; one of {list(MODEL_STATUSES)}")
    row = _row(s, version)
    if status == "retired" and row.status == "production":
        raise RegistryError(f"{version} is production: promote another version to retire it")
    if status not in TRANSITIONS[row.status]:
        raise RegistryError(f"{version}: {row.status} -> {status} is not allowed "
                            f"(from {row.status}: {sorted(TRANSITIONS[row.status]) or 'nothing'})")
    now = _now()
    if status == "production":
        old = s.scalar(select(ModelVersion).where(ModelVersion.status == "production").with_for_update())
        if old is not None:
            s.add(ModelEvent(model_id=old.id, status_before="production", status_after="retired", actor=actor,
                             reason=f"replaced by {version}", created_at=now))
            old.status = "retired"
            s.flush()
        row.promoted_at, row.promoted_by = now, actor
    s.add(ModelEvent(model_id=row.id, status_before=row.status, status_after=status, actor=actor, reason=reason,
                     created_at=now))
    row.status = status
    s.flush()
    return ModelInfo.of(row)
