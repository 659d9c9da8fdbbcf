"""``/api/v1/export/yolo.zip``: reviewed samples as an Ultralytics YOLO dataset, streamed."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Query
from fastapi.responses import StreamingResponse

from hub.accounts import Principal
from hub.api.context import HubContext
from hub.api.deps import get_context, require
from hub.export import iter_zip

__all__ = ["router"]

router = APIRouter(prefix="/api/v1/export", tags=["export"])


@router.get("/yolo.zip", response_class=StreamingResponse, responses={200: {"content": {"application/zip": {}}}})
def yolo_zip(ctx: Annotated[HubContext, Depends(get_context)], _: Annotated[Principal, Depends(require("reviewer"))],
             classes: Annotated[str | None, Query(description="comma-separated class order (the model's)")] = None,
             val_share: Annotated[float, Query(ge=0, le=0.5)] = 0.2) -> StreamingResponse:
    order = [c for c in classes.split(",") if c] if classes else None

    def body() -> Iterator[bytes]:
        with ctx.sessions() as s:  # its own session: the stream outlives the request's
            yield from iter_zip(s, ctx.blobs, order, val_share)

    name = f"lineguard-dataset-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.zip"
    return StreamingResponse(body(), media_type="application/zip",
                             headers={"Content-Disposition": f'attachment; filename="{name}"'})
