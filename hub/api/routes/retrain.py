"""``/api/v1/retrain/jobs``: retraining jobs (state, step, gate verdict), their gate reports, and
starting one now (admin). A job runs as a child process (``lineguard-hub retrain``), never in
the request: the POST returns 202 at once; progress is the job's state."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, status
from fastapi.responses import FileResponse

from hub.accounts import Principal
from hub.api.context import HubContext
from hub.api.deps import CurrentUser, get_context, require
from hub.retrain import JobState, RetrainBusy, job_lock
from hub.retrain_worker import jobs_root, spawn_retrain

__all__ = ["list_jobs", "router", "start_job"]

router = APIRouter(prefix="/api/v1/retrain", tags=["retrain"])
Ctx = Annotated[HubContext, Depends(get_context)]
REPORT_FILES = {"gate.json": "application/json", "confusion.png": "image/png", "pr_curves.png": "image/png"}


def _root(ctx: HubContext) -> Path:
    if ctx.config.retrain is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "retraining is not configured on this hub")
    return jobs_root(ctx.config)


@router.get("/jobs")
def jobs(ctx: Ctx, _: CurrentUser, limit: Annotated[int, Query(ge=1, le=200)] = 50) -> list[dict[str, Any]]:
    return list_jobs(ctx, limit)


@router.get("/jobs/{job_id}/report/{name}")
def report(job_id: str, name: str, ctx: Ctx, _: CurrentUser) -> FileResponse:
    if name not in REPORT_FILES or "/" in job_id or job_id.startswith("."):
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such report file")
    path = _root(ctx) / job_id / "gate" / name
    if not path.is_file():
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"job {job_id} has no {name} (yet)")
    return FileResponse(path, media_type=REPORT_FILES[name])


def start_job(ctx: HubContext, username: str) -> int:
    """Start a retraining job as a child process; its pid. :class:`RetrainBusy` while a job runs."""
    root = _root(ctx)
    root.mkdir(parents=True, exist_ok=True)
    with job_lock(root / ".lock"):
        pass
    return spawn_retrain(ctx.config, trigger="manual", requested_by=username).pid


def list_jobs(ctx: HubContext, limit: int = 50) -> list[dict[str, Any]]:
    root = _root(ctx)
    states = sorted(root.glob("*/state.json"), reverse=True)[:limit] if root.exists() else []
    return [asdict(JobState.read(p)) for p in states]


@router.post("/jobs", status_code=status.HTTP_202_ACCEPTED)
def start(ctx: Ctx, who: Annotated[Principal, Depends(require("admin"))]) -> dict[str, Any]:
    try:
        pid = start_job(ctx, who.username)
    except RetrainBusy as e:
        raise HTTPException(status.HTTP_409_CONFLICT, str(e)) from None
    return {"started": True, "pid": pid, "requested_by": who.username}
