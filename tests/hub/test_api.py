"""The REST API and the UI's server side, in-process (FastAPI TestClient) on a real database:
SQLite always, PostgreSQL when TEST_DATABASE_URL is set. Samples arrive through the real
ingest pipeline (contract-encoded payloads)."""

from __future__ import annotations

import io
import re
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
from fastapi.testclient import TestClient

from hub.accounts import create_token
from hub.api import HubContext, create_app
from hub.tables import Agent, Station
from lineguard_contract import SamplePayload, StationId

PASSWORD = "correct horse battery"
OTHER = StationId("plant1", "lineB", "st01")


@dataclass
class Hub:
    ctx: HubContext
    client: TestClient
    samples: list[SamplePayload]

    def login(self, username: str, password: str = PASSWORD) -> TestClient:
        c = TestClient(self.client.app)
        page = c.get("/login")
        token = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
        assert token, page.text
        r = c.post("/login", data={"username": username, "password": password, "csrf_token": token.group(1),
                                   "next": "/queue"}, follow_redirects=False)
        assert r.status_code == 303, r.text
        return c

    def csrf(self, c: TestClient) -> str:
        m = re.search(r'name="csrf_token" value="([^"]+)"', c.get("/queue").text)
        assert m
        return m.group(1)


@pytest.fixture
def hub(hub_store: Any, sample_factory: Callable[..., SamplePayload]) -> Iterator[Hub]:
    samples = [sample_factory(seed=i, n_dets=1 + i % 2) for i in range(6)]
    samples.append(sample_factory(seed=50, station=OTHER, n_dets=0))
    hub_store.ingest(samples)
    hub_store.add_users(PASSWORD, vera="viewer", rita="reviewer", ada="admin")
    sessions = hub_store.sessions
    with sessions.begin() as s:
        st = s.query(Station).filter_by(line="lineA").one()
        s.add(Agent(station_id=st.id, agent_id="agent-st03", state="online", model_version="1.2.0",
                    last_seen=datetime.now(UTC), fps=29.5, outbox_depth=3, mode="auto"))
    ctx = HubContext(hub_store.config, sessions, hub_store.blobs)
    yield Hub(ctx, TestClient(create_app(ctx)), samples)


@pytest.mark.parametrize("method,path", [
    ("GET", "/api/v1/samples"), ("GET", "/api/v1/fleet"), ("GET", "/api/v1/models"), ("GET", "/api/v1/classes"),
    ("POST", "/api/v1/classes"), ("GET", "/api/v1/users"), ("GET", "/api/v1/export/yolo.zip"),
    ("POST", "/api/v1/samples/00000000-0000-4000-8000-000000000000/review"),
])
def test_unauthenticated_api_requests_are_refused(hub: Hub, method: str, path: str) -> None:
    r = hub.client.request(method, path, json={})
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("path", ["/queue", "/fleet", "/charts", "/models", "/admin/users",
                                  "/samples/00000000-0000-4000-8000-000000000000"])
def test_unauthenticated_pages_redirect_to_login(hub: Hub, path: str) -> None:
    r = hub.client.get(path, follow_redirects=False)
    assert r.status_code == 303
    assert r.headers["location"].startswith("/login?next=")


def test_login_needs_the_right_password_and_the_login_csrf_cookie(hub: Hub) -> None:
    c = TestClient(hub.client.app)
    token = re.search(r'name="csrf_token" value="([^"]+)"', c.get("/login").text).group(1)  # type: ignore[union-attr]
    wrong = c.post("/login", data={"username": "rita", "password": "nope nope nope", "csrf_token": token})
    assert wrong.status_code == 200 and "Wrong user or password" in wrong.text
    assert "lg_session" not in c.cookies
    forged = TestClient(hub.client.app).post("/login", data={"username": "rita", "password": PASSWORD,
                                                             "csrf_token": "made-up"}, follow_redirects=False)
    assert forged.status_code == 403
    logged = hub.login("rita")
    assert logged.get("/queue").status_code == 200
    cookie = next(c for c in logged.cookies.jar if c.name == "lg_session")
    assert cookie.has_nonstandard_attr("HttpOnly")


def test_queue_lists_and_filters(hub: Hub) -> None:
    c = hub.login("vera")
    page = c.get("/api/v1/samples").json()
    assert page["total"] == 7 and len(page["items"]) == 7
    ts = [i["capture_ts"] for i in page["items"]]
    assert ts == sorted(ts, reverse=True)  # newest first
    cases: list[tuple[dict[str, Any], int]] = [
        ({"line": "lineA"}, 6), ({"line": "lineB"}, 1), ({"site": "plant1", "station": "st03"}, 6),
        ({"cls": "scratch"}, 6), ({"status": "new"}, 7), ({"status": "confirmed"}, 0),
        ({"reason": "random_negative"}, 1), ({"min_score": 0.505}, 3), ({"max_score": 0.4}, 1),
        ({"camera": "cam9"}, 0), ({"since": "2026-01-01T00:00:03Z"}, 4), ({"until": "2026-01-01T00:00:02Z"}, 2),
    ]
    for params, expected in cases:
        got = c.get("/api/v1/samples", params=params).json()
        assert got["total"] == expected, (params, got["total"])
    paged = c.get("/api/v1/samples", params={"page": 2, "page_size": 3}).json()
    assert paged["pages"] == 3 and len(paged["items"]) == 3
    assert c.get("/api/v1/samples", params={"status": "bogus"}).status_code == 422
    html = c.get("/queue", params={"line": "lineB"}).text
    assert hub.samples[-1].sample_id in html and hub.samples[0].sample_id not in html


def test_viewer_cannot_review_and_reviewer_can(hub: Hub) -> None:
    sid = hub.samples[0].sample_id
    viewer = hub.login("vera")
    r = viewer.post(f"/api/v1/samples/{sid}/review", json={"action": "confirm"},
                    headers={"X-CSRF-Token": hub.csrf(viewer)})
    assert r.status_code == 403
    assert "reviewer" in r.json()["detail"]
    assert "You can look but not review" in viewer.get(f"/samples/{sid}").text
    reviewer = hub.login("rita")
    r = reviewer.post(f"/api/v1/samples/{sid}/review", json={"action": "confirm"},
                      headers={"X-CSRF-Token": hub.csrf(reviewer)})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "confirmed"
    assert body["labels"] == [{"cls": d.cls, "box": d.box} for d in hub.samples[0].detections]
    assert [(h["username"], h["action"], h["status_before"]) for h in body["history"]] == [("rita", "confirm", "new")]


@pytest.mark.parametrize("headers,form_token,expected", [
    ({}, None, 403),  # no token at all
    ({"X-CSRF-Token": "wrong"}, None, 403),
    ({}, "wrong", 403),
    ({}, "SESSION", 303),  # the session's token in the form field
])
def test_a_csrf_less_form_post_is_refused(hub: Hub, headers: dict[str, str], form_token: str | None,
                                          expected: int) -> None:
    c = hub.login("rita")
    sid = hub.samples[1].sample_id
    data = {"action": "reject", "next": "/queue"}
    if form_token is not None:
        data["csrf_token"] = hub.csrf(c) if form_token == "SESSION" else form_token
    r = c.post(f"/samples/{sid}/review", data=data, headers=headers, follow_redirects=False)
    assert r.status_code == expected
    status = c.get(f"/api/v1/samples/{sid}").json()["status"]
    assert status == ("rejected" if expected == 303 else "new")


def test_json_post_with_the_cookie_but_no_csrf_header_is_refused(hub: Hub) -> None:
    c = hub.login("rita")
    r = c.post(f"/api/v1/samples/{hub.samples[0].sample_id}/review", json={"action": "reject"})
    assert r.status_code == 403


@pytest.mark.parametrize("body,error", [
    ({"action": "confirm", "boxes": [{"cls": "scratch", "box": [10, 10, 5, 20]}]}, "outside"),
    ({"action": "confirm", "boxes": [{"cls": "scratch", "box": [0, 0, 65, 20]}]}, "outside"),
    ({"action": "confirm", "boxes": [{"cls": "crack", "box": [1, 1, 5, 5]}]}, "unknown class"),
    ({"action": "confirm", "boxes": []}, "reject a frame"),
    ({"action": "reject", "boxes": [{"cls": "scratch", "box": [1, 1, 5, 5]}]}, "no defect"),
    ({"action": "approve"}, "action"),
    ({"action": "confirm", "extra": 1}, "extra"),
])
def test_bad_reviews_are_refused_with_a_reason(hub: Hub, body: dict[str, Any], error: str) -> None:
    c = hub.login("rita")
    sid = hub.samples[0].sample_id
    r = c.post(f"/api/v1/samples/{sid}/review", json=body, headers={"X-CSRF-Token": hub.csrf(c)})
    assert r.status_code == 422
    assert error in str(r.json()["detail"])
    assert c.get(f"/api/v1/samples/{sid}").json()["status"] == "new"


def test_relabel_with_a_new_class_then_reject_then_reopen_keeps_the_history(hub: Hub) -> None:
    c = hub.login("rita")
    h = {"X-CSRF-Token": hub.csrf(c)}
    sid = hub.samples[2].sample_id
    assert c.post("/api/v1/classes", json={"name": "crack"}, headers=h).status_code == 201
    assert c.post("/api/v1/classes", json={"name": "crack"}, headers=h).status_code == 409
    assert "crack" in c.get("/api/v1/classes").json()
    boxes = [{"cls": "crack", "box": [2.0, 3.0, 20.0, 30.0]}, {"cls": "scratch", "box": [30.0, 4.0, 60.0, 40.0]}]
    r = c.post(f"/api/v1/samples/{sid}/review", json={"action": "confirm", "boxes": boxes, "note": "two"}, headers=h)
    assert r.status_code == 200 and r.json()["labels"] == boxes
    assert c.post(f"/api/v1/samples/{sid}/review", json={"action": "reject"}, headers=h).json()["labels"] == []
    final = c.post(f"/api/v1/samples/{sid}/review", json={"action": "reopen"}, headers=h).json()
    assert final["status"] == "new" and final["reviewed_at"] is None
    assert [(x["action"], x["status_after"], len(x["boxes"])) for x in final["history"]] == [
        ("confirm", "confirmed", 2), ("reject", "rejected", 0), ("reopen", "new", 0)]
    page = c.get(f"/samples/{sid}").text
    assert "rita</b> confirm" in page and "&ldquo;two&rdquo;" in page


def test_bearer_token_works_without_csrf_and_a_bad_one_is_refused(hub: Hub) -> None:
    with hub.ctx.sessions.begin() as s:
        secret = create_token(s, "rita", "script")
    assert secret.startswith("lgt_")
    c = TestClient(hub.client.app)
    auth = {"Authorization": f"Bearer {secret}"}
    sid = hub.samples[3].sample_id
    r = c.post(f"/api/v1/samples/{sid}/review", json={"action": "confirm"}, headers=auth)
    assert r.status_code == 200 and r.json()["history"][0]["username"] == "rita"
    assert c.get("/api/v1/users", headers=auth).status_code == 403  # a reviewer's token is a reviewer
    for bad in ("Bearer lgt_nope", "Basic cml0YTpwdw==", "Bearer "):
        assert c.get("/api/v1/samples", headers={"Authorization": bad}).status_code == 401


def test_admin_manages_users_and_tokens(hub: Hub) -> None:
    c = hub.login("ada")
    h = {"X-CSRF-Token": hub.csrf(c)}
    r = c.post("/api/v1/users", json={"username": "quinn", "password": "x" * 12, "role": "reviewer"}, headers=h)
    assert r.status_code == 201
    assert c.post("/api/v1/users", json={"username": "quinn", "password": "x" * 12, "role": "viewer"},
                  headers=h).status_code == 422
    assert c.post("/api/v1/users", json={"username": "short", "password": "x", "role": "viewer"},
                  headers=h).status_code == 422
    assert {u["username"] for u in c.get("/api/v1/users").json()} == {"vera", "rita", "ada", "quinn"}
    tok = c.post("/api/v1/tokens", json={"name": "ci", "username": "quinn"}, headers=h).json()["token"]
    as_quinn = TestClient(hub.client.app, headers={"Authorization": f"Bearer {tok}"})
    assert as_quinn.get("/api/v1/samples").status_code == 200
    rita = hub.login("rita")
    r = rita.post("/api/v1/tokens", json={"name": "x", "username": "quinn"}, headers={"X-CSRF-Token": hub.csrf(rita)})
    assert r.status_code == 403


def test_logout_ends_the_session(hub: Hub) -> None:
    c = hub.login("vera")
    cookie = c.cookies["lg_session"]
    assert c.post("/logout", data={"csrf_token": hub.csrf(c)}, follow_redirects=False).status_code == 303
    replay = TestClient(hub.client.app, cookies={"lg_session": cookie})
    assert replay.get("/api/v1/samples").status_code == 401


def test_export_is_an_ultralytics_yolo_dataset_of_reviewed_samples(hub: Hub) -> None:
    c = hub.login("rita")
    h = {"X-CSRF-Token": hub.csrf(c)}
    confirmed, rejected = hub.samples[1], hub.samples[4]
    c.post(f"/api/v1/samples/{confirmed.sample_id}/review",
           json={"action": "confirm", "boxes": [{"cls": "scratch", "box": [16.0, 12.0, 48.0, 36.0]}]}, headers=h)
    c.post(f"/api/v1/samples/{rejected.sample_id}/review", json={"action": "reject"}, headers=h)
    r = c.get("/api/v1/export/yolo.zip", params={"val_share": 0})
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
    z = zipfile.ZipFile(io.BytesIO(r.content))
    names = set(z.namelist())
    assert names == {"data.yaml", f"images/train/{confirmed.sample_id}.jpg", f"labels/train/{confirmed.sample_id}.txt",
                     f"images/train/{rejected.sample_id}.jpg", f"labels/train/{rejected.sample_id}.txt"}
    assert "names:\n  0: scratch" in z.read("data.yaml").decode()
    assert z.read(f"labels/train/{confirmed.sample_id}.txt").decode() == "0 0.500000 0.500000 0.500000 0.500000\n"
    assert z.read(f"labels/train/{rejected.sample_id}.txt") == b""
    assert z.read(f"images/train/{confirmed.sample_id}.jpg") == confirmed.image
    assert hub.login("vera").get("/api/v1/export/yolo.zip").status_code == 403


def test_fleet_models_charts_and_metrics(hub: Hub) -> None:
    c = hub.login("vera")
    fleet = c.get("/api/v1/fleet").json()
    assert [(a["station"], a["state"], a["outbox_depth"], a["mode"]) for a in fleet] == [("st03", "online", 3, "auto")]
    page = c.get("/fleet").text
    assert "agent-st03" in page and "<td>auto</td>" in page
    models = c.get("/api/v1/models").json()
    assert models == [{"version": "1.2.0", "agents": ["plant1/lineA/st03 (agent-st03, online)"], "samples": 7}]
    series = c.get("/api/v1/stats/defects", params={"days": 366 * 2 // 2, "bucket": "day"})
    assert series.status_code == 200
    assert "<svg" in c.get("/charts", params={"days": 366}).text or "No defect samples" in c.get("/charts").text
    c.get("/queue")
    metrics = TestClient(hub.client.app).get("/metrics").text
    assert "lineguard_hub_review_queue_depth 7.0" in metrics
    assert 'lineguard_hub_http_request_seconds_count{method="GET",route="/queue",status="200"}' in metrics
    spec = c.get("/openapi.json").json()
    assert {"/api/v1/samples", "/api/v1/samples/{sample_id}/review", "/api/v1/export/yolo.zip"} <= set(spec["paths"])
