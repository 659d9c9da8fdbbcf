"""The FastAPI application: REST API (``/api/v1``, OpenAPI at ``/openapi.json``), the UI pages,
static files, ``/metrics`` (Prometheus) and ``/healthz``. Built by :func:`create_app` from a
:class:`HubContext`; nothing is built at import time."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import quote

from fastapi import FastAPI, Request, Response
from fastapi.responses import PlainTextResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text
from starlette.routing import Match

from hub.api.context import HubContext
from hub.api.deps import LoginRequired
from hub.api.routes import bundles, export, fleet, retrain, samples, users
from hub.web import pages

__all__ = ["create_app"]

STATIC_DIR = Path(__file__).resolve().parent.parent / "web" / "static"
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; "
                               "script-src 'self'; frame-ancestors 'none'",
}


def _route_of(app: FastAPI, request: Request) -> str:
    """The route template (``/samples/{sample_id}``) a request matched: bounded label values."""
    for r in app.router.routes:
        match, _ = r.matches({**request.scope, "path": request.url.path})
        if match == Match.FULL:
            return str(getattr(r, "path", "unmatched"))
    return "unmatched"


def create_app(ctx: HubContext) -> FastAPI:
    app = FastAPI(title="LineGuard hub", version="1", openapi_url="/openapi.json", docs_url="/docs",
                  redoc_url=None)
    app.state.ctx = ctx
    for r in (samples.router, fleet.router, users.router, export.router, retrain.router, bundles.router,
              pages.router):
        app.include_router(r)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.exception_handler(LoginRequired)
    async def _login(request: Request, exc: LoginRequired) -> Response:
        return RedirectResponse(f"/login?next={quote(exc.next_url, safe='')}", status_code=303)

    @app.middleware("http")
    async def _observe(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        start = time.perf_counter()
        response = await call_next(request)
        route = getattr(request.scope.get("route"), "path", None) or _route_of(app, request)
        ctx.metrics.requests.labels(request.method, route, str(response.status_code)).observe(
            time.perf_counter() - start)
        for k, v in SECURITY_HEADERS.items():
            response.headers.setdefault(k, v)
        return response

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        return Response(generate_latest(ctx.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> Response:
        with ctx.sessions() as s:
            s.execute(text("SELECT 1"))
        return PlainTextResponse("ok")

    return app
