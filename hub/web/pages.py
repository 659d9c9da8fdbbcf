"""The UI's pages: login/logout, review queue, review page, fleet, charts, models, users.

Pages read through the same services as the REST API (:mod:`hub.review`, :mod:`hub.fleet`);
the review page's buttons and shortcuts post to the API with the session's CSRF token.
Form posts (login, logout, add user, the review form without JavaScript) carry the token in a
hidden field. The login form, made before there is a session, uses a double-submit cookie.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Form, HTTPException, Request, status
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from sqlalchemy import select

from hub.accounts import AccountError, Principal, authenticate, create_user, end_session, start_session
from hub.api.context import HubContext
from hub.api.deps import SESSION_COOKIE, CurrentUser, Db, get_context, require
from hub.api.routes.samples import Filter, review_sample
from hub.core.security import ROLES, constant_time_equal, new_secret
from hub.fleet import STALE_AFTER, defect_series, list_agents, model_versions
from hub.review import get_sample, history, known_classes, list_samples
from hub.schemas import BoxIn, ReviewIn
from hub.tables import SAMPLE_STATUSES, Sample, User
from hub.web.charts import defect_chart_svg

__all__ = ["router", "TEMPLATES"]

TEMPLATES = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))
LOGIN_CSRF_COOKIE = "lg_login_csrf"
router = APIRouter(include_in_schema=False)


def _page(request: Request, name: str, user: Principal | None, **ctx: Any) -> HTMLResponse:
    return TEMPLATES.TemplateResponse(request, name, {"user": user, **ctx})


def _safe_next(url: str) -> str:
    return url if url.startswith("/") and not url.startswith("//") else "/queue"


def _query(request: Request) -> str:
    return urlencode([(k, v) for k, v in request.query_params.multi_items() if k != "page" and v])


@router.get("/", response_class=RedirectResponse)
def root() -> RedirectResponse:
    return RedirectResponse("/queue", status.HTTP_303_SEE_OTHER)


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, next: str = "/queue", error: str | None = None) -> HTMLResponse:
    token = new_secret()
    resp = _page(request, "login.html", None, csrf_token=token, next=_safe_next(next), error=error)
    resp.set_cookie(LOGIN_CSRF_COOKIE, token, httponly=True, samesite="strict", path="/login",
                    secure=request.app.state.ctx.config.http.cookie_secure)
    return resp


@router.post("/login", response_model=None)
def login(request: Request, db: Db, ctx: Annotated[HubContext, Depends(get_context)],
          username: Annotated[str, Form()], password: Annotated[str, Form()],
          csrf_token: Annotated[str, Form()] = "", next: Annotated[str, Form()] = "/queue") -> Response:
    cookie = request.cookies.get(LOGIN_CSRF_COOKIE, "")
    if not cookie or not csrf_token or not constant_time_equal(cookie, csrf_token):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "missing or wrong CSRF token; reload the login page")
    user = authenticate(db, username, password)
    if user is None:
        db.commit()
        return login_form(request, next, error="Wrong user or password.")
    secret, _ = start_session(db, user, timedelta(hours=ctx.config.http.session_hours))
    db.commit()
    resp = RedirectResponse(_safe_next(next), status.HTTP_303_SEE_OTHER)
    resp.set_cookie(SESSION_COOKIE, secret, httponly=True, samesite="lax", secure=ctx.config.http.cookie_secure,
                    max_age=int(ctx.config.http.session_hours * 3600))
    resp.delete_cookie(LOGIN_CSRF_COOKIE, path="/login")
    return resp


@router.post("/logout", response_class=RedirectResponse)
def logout(request: Request, db: Db, _: CurrentUser) -> RedirectResponse:
    end_session(db, request.cookies.get(SESSION_COOKIE, ""))
    db.commit()
    resp = RedirectResponse("/login", status.HTTP_303_SEE_OTHER)
    resp.delete_cookie(SESSION_COOKIE)
    return resp


@router.get("/queue", response_class=HTMLResponse)
def queue(request: Request, db: Db, user: CurrentUser, flt: Filter, page: int = 1) -> HTMLResponse:
    p = list_samples(db, flt, max(page, 1), 50)
    return _page(request, "queue.html", user, page=p, f=flt, classes=known_classes(db),
                 statuses=SAMPLE_STATUSES, query=_query(request))


def _next_url(db: Db, s: Sample, flt: Filter, query: str) -> str:
    """The next older sample in the same filtered queue, or the queue itself."""
    q = flt.apply(select(Sample.sample_id)).where(
        (Sample.capture_ts < s.capture_ts) | ((Sample.capture_ts == s.capture_ts) & (Sample.id < s.id))
    ).order_by(Sample.capture_ts.desc(), Sample.id.desc()).limit(1)
    nxt = db.scalar(q)
    return f"/samples/{nxt}?{query}" if nxt else f"/queue?{query}"


@router.get("/samples/{sample_id}", response_class=HTMLResponse)
def review_page(sample_id: str, request: Request, db: Db, user: CurrentUser, flt: Filter) -> HTMLResponse:
    s = get_sample(db, sample_id)
    if s is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no sample {sample_id}")
    query = _query(request)
    next_url = _next_url(db, s, flt, query)
    classes = known_classes(db)
    boxes = ([{"cls": lb.cls, "box": [lb.x1, lb.y1, lb.x2, lb.y2], "score": None} for lb in s.labels]
             if s.status == "confirmed" else
             [{"cls": d.cls, "box": [d.x1, d.y1, d.x2, d.y2], "score": d.score} for d in s.detections])
    data = {"sample_id": s.sample_id, "width": s.width, "height": s.height, "boxes": boxes, "classes": classes,
            "csrf_token": user.csrf_token, "next_url": next_url}
    return _page(request, "review.html", user, s=s, history=history(db, s), classes=classes, data=data,
                 next_url=next_url, query=query, can_review=user.role in ("reviewer", "admin"))


@router.post("/samples/{sample_id}/review", response_class=RedirectResponse)
def review_form(sample_id: str, db: Db, ctx: Annotated[HubContext, Depends(get_context)],
                who: Annotated[Principal, Depends(require("reviewer"))], action: Annotated[str, Form()],
                boxes: Annotated[str, Form()] = "", note: Annotated[str, Form()] = "",
                next: Annotated[str, Form()] = "/queue") -> RedirectResponse:
    """The review form without JavaScript: confirm keeps the model's boxes."""
    try:
        body = ReviewIn(action=action, note=note,
                        boxes=[BoxIn(**b) for b in json.loads(boxes)] if boxes else None)
    except (ValueError, TypeError) as e:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, f"bad review form: {e}") from None
    review_sample(db, ctx, who, sample_id, body)
    return RedirectResponse(_safe_next(next), status.HTTP_303_SEE_OTHER)


@router.get("/fleet", response_class=HTMLResponse)
def fleet(request: Request, db: Db, user: CurrentUser) -> HTMLResponse:
    return _page(request, "fleet.html", user, agents=list_agents(db), stale_s=int(STALE_AFTER.total_seconds()))


@router.get("/models", response_class=HTMLResponse)
def models(request: Request, db: Db, user: CurrentUser, ctx: Annotated[HubContext, Depends(get_context)],
           message: str | None = None, error: str | None = None) -> HTMLResponse:
    from hub.api.routes.retrain import list_jobs
    from hub.registry import list_versions

    registry = [{**asdict(m), "gate": m.metrics.get("gate"), "job": m.metrics.get("job")} for m in list_versions(db)]
    jobs = list_jobs(ctx, 20) if ctx.config.retrain is not None else None
    return _page(request, "models.html", user, models=model_versions(db), registry=registry[::-1], jobs=jobs,
                 rollout=ctx.config.rollout is not None, message=message, error=error)


@router.post("/models/retrain", response_class=RedirectResponse)
def retrain_now(ctx: Annotated[HubContext, Depends(get_context)],
                user: Annotated[Principal, Depends(require("admin"))]) -> RedirectResponse:
    from hub.api.routes.retrain import start_job
    from hub.retrain import RetrainBusy

    try:
        start_job(ctx, user.username)
        q = {"message": "retraining started; its progress shows below"}
    except (RetrainBusy, HTTPException) as e:
        q = {"error": str(getattr(e, "detail", e))}
    return RedirectResponse("/models?" + urlencode(q), status.HTTP_303_SEE_OTHER)


@router.post("/models/{version}/{action}", response_class=RedirectResponse)
def model_action(version: str, action: str, db: Db, ctx: Annotated[HubContext, Depends(get_context)],
                 user: Annotated[Principal, Depends(require("admin"))],
                 reason: Annotated[str, Form()] = "") -> RedirectResponse:
    """``canary`` (the configured share), ``promote`` (every station) or ``rollback``, from the UI."""
    from hub.mqtt import RetainedPublisher
    from hub.registry import RegistryError
    from hub.rollout import RolloutError, promote, rollback, start_canary

    rc = ctx.config.rollout
    if action not in ("canary", "promote", "rollback"):
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no action {action!r}")
    if rc is None:
        return RedirectResponse("/models?" + urlencode({"error": "no rollout section in the hub config"}),
                                status.HTTP_303_SEE_OTHER)
    why = reason or f"{action} from the UI"
    try:
        with RetainedPublisher(ctx.config.mqtt, f"lineguard-hub-ui-{user.username}"[:64]) as pub:
            if action == "canary":
                n = len(start_canary(db, pub.publish, version, public_url=rc.public_url, actor=user.username,
                                     share=rc.canary_share))
            elif action == "promote":
                n = promote(db, pub.publish, version, public_url=rc.public_url, actor=user.username, reason=why)
            else:
                n = rollback(db, pub.publish, version, public_url=rc.public_url, actor=user.username, reason=why)
        db.commit()
        q = {"message": f"{version}: {action} announced to {n} stations"}
    except (RolloutError, RegistryError, ConnectionError) as e:
        db.rollback()
        q = {"error": str(e)}
    return RedirectResponse("/models?" + urlencode(q), status.HTTP_303_SEE_OTHER)


@router.get("/charts", response_class=HTMLResponse)
def charts(request: Request, db: Db, user: CurrentUser, days: float = 7, bucket: str = "hour") -> HTMLResponse:
    bucket = bucket if bucket in ("hour", "day") else "hour"
    days = min(max(days, 0.1), 366)
    points = defect_series(db, datetime.now(UTC) - timedelta(days=days), bucket)
    return _page(request, "charts.html", user, svg=defect_chart_svg(points), days=days, bucket=bucket)


@router.get("/admin/users", response_class=HTMLResponse)
def users(request: Request, db: Db, user: Annotated[Principal, Depends(require("admin"))],
          error: str | None = None) -> HTMLResponse:
    return _page(request, "users.html", user, users=list(db.scalars(select(User).order_by(User.username))),
                 roles=ROLES, error=error)


@router.post("/admin/users", response_model=None)
def add_user(request: Request, db: Db, user: Annotated[Principal, Depends(require("admin"))],
             username: Annotated[str, Form()], password: Annotated[str, Form()],
             role: Annotated[str, Form()]) -> Response:
    try:
        create_user(db, username, password, role)
    except AccountError as e:
        db.rollback()
        return users(request, db, user, error=str(e))
    db.commit()
    return RedirectResponse("/admin/users", status.HTTP_303_SEE_OTHER)
