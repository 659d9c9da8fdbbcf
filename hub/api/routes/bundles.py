"""``/api/v1/bundles/{version}/{file}``: the files of a registered bundle, for agents updating over
the air (any signed-in role; an agent uses a viewer's API token). ``manifest.json``,
``manifest.sig`` and the files the manifest lists, nothing else; a rejected version is never
served. Downloads resume with HTTP ``Range`` (Starlette's ``FileResponse`` answers 206)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException, status
from fastapi.responses import FileResponse

from hub.api.deps import CurrentUser, Db
from hub.registry import RegistryError, get
from models.bundle import MANIFEST_FILE, SIGNATURE_FILE, read_manifest

__all__ = ["router"]

router = APIRouter(prefix="/api/v1/bundles", tags=["bundles"])


@router.get("/{version}/{name}")
def bundle_file(version: str, name: str, db: Db, _: CurrentUser) -> FileResponse:
    try:
        info = get(db, version)
    except RegistryError:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no bundle version {version}") from None
    if info.status == "rejected":
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"version {version} was rejected")
    root = Path(info.bundle_path)
    allowed = {MANIFEST_FILE, SIGNATURE_FILE} | {e.path for e in read_manifest(root).files.values()}
    if name not in allowed:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"{name} is not a file of bundle {version}")
    path = root / name
    if not path.is_file():
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"{name} of bundle {version} is not on this hub")
    # end the transaction before the file streams: on SQLite the web sessions hold the write lock
    # from their first statement, and 50 agents downloading at once must not queue on it
    db.commit()
    return FileResponse(path, media_type="application/json" if name.endswith(".json") else "application/octet-stream")
