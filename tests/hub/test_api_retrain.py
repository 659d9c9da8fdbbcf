"""``/api/v1/retrain/jobs``: who may see and start retraining, the job running as a child process
(never in the request), its state and its gate report files."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from hub.api import HubContext, create_app
from hub.core.config import build_config
from tests.hub.test_api import PASSWORD, Hub


@pytest.fixture
def hub(hub_store: Any, tmp_path: Path) -> Hub:
    hub_store.add_users(PASSWORD, vera="viewer", ada="admin")
    data = json.loads(hub_store.config.model_dump_json(exclude_none=True))
    config = build_config({**data, "retrain": {"golden": str(tmp_path / "golden"), "min_reviewed": 1}})
    ctx = HubContext(config, hub_store.sessions, hub_store.blobs)
    return Hub(ctx, TestClient(create_app(ctx)), [])


def test_admin_starts_a_job_that_runs_outside_the_request(hub: Hub) -> None:
    vera, ada = hub.login("vera"), hub.login("ada")
    assert vera.get("/api/v1/retrain/jobs").json() == []
    assert vera.post("/api/v1/retrain/jobs", headers={"X-CSRF-Token": hub.csrf(vera)}).status_code == 403
    assert ada.post("/api/v1/retrain/jobs").status_code == 403  # a session without the CSRF token
    t0 = time.monotonic()
    r = ada.post("/api/v1/retrain/jobs", headers={"X-CSRF-Token": hub.csrf(ada)})
    assert r.status_code == 202 and r.json()["requested_by"] == "ada", r.text
    assert time.monotonic() - t0 < 5  # the request does not wait for the job
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        jobs = vera.get("/api/v1/retrain/jobs").json()
        if jobs and jobs[0]["status"] == "failed":
            break
        time.sleep(0.2)
    (job,) = jobs
    assert job["status"] == "failed" and job["requested_by"] == "ada" and job["step"] == "snapshot"
    assert "no production model" in job["error"]  # this hub has none registered: the job says so


def test_gate_report_files(hub: Hub) -> None:
    root = hub.ctx.config.data_dir / "retrain"
    (root / "20261123T000000-1-abcd" / "gate").mkdir(parents=True)
    (root / "20261123T000000-1-abcd" / "gate" / "gate.json").write_text('{"passed": false}')
    vera = hub.login("vera")
    r = vera.get("/api/v1/retrain/jobs/20261123T000000-1-abcd/report/gate.json")
    assert r.status_code == 200 and r.json() == {"passed": False}
    assert vera.get("/api/v1/retrain/jobs/20261123T000000-1-abcd/report/confusion.png").status_code == 404
    assert vera.get("/api/v1/retrain/jobs/20261123T000000-1-abcd/report/state.json").status_code == 404
    assert vera.get("/api/v1/retrain/jobs/..%2F..%2Fetc/report/gate.json").status_code == 404
    assert TestClient(hub.client.app).get("/api/v1/retrain/jobs").status_code == 401


def test_without_a_retrain_section_there_is_nothing(hub_store: Any) -> None:
    hub_store.add_users(PASSWORD, vera="viewer")
    ctx = HubContext(hub_store.config, hub_store.sessions, hub_store.blobs)
    h = Hub(ctx, TestClient(create_app(ctx)), [])
    assert h.login("vera").get("/api/v1/retrain/jobs").status_code == 404
