"""The Models page: the registry with gate verdicts and report links, retraining jobs, and an
admin's canary / promote / rollback buttons (CSRF-checked forms) announcing through the broker."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from hub.api import HubContext, create_app
from hub.core.config import build_config
from hub.registry import get, register
from hub.tables import ModelVersion
from lineguard_contract import StationId
from tests.hub.test_api import PASSWORD, Hub
from tests.hub.test_rollout import make_version

ROOT = Path(__file__).resolve().parents[2]


def _hub(hub_store: Any, sample_factory: Any, tmp_path: Path, extra: dict[str, Any]) -> Hub:
    for v in ("1.0.0", "1.1.0"):
        make_version(ROOT / "models" / "default", tmp_path / "b" / v, v, None)
    hub_store.ingest([sample_factory(seed=i, station=StationId("p", "l", f"s{i}"), model_version="1.0.0")
                      for i in range(4)])
    hub_store.add_users(PASSWORD, vera="viewer", ada="admin")
    with hub_store.sessions.begin() as s:
        register(s, tmp_path / "b" / "1.0.0", actor="t", status="production")
        register(s, tmp_path / "b" / "1.1.0", actor="retrain")
        row = s.query(ModelVersion).filter_by(version="1.1.0").one()
        row.metrics_json = json.dumps({"gate": {"passed": True, "reasons": []}, "job": "20261123T000000-1-abcd"})
    data = json.loads(hub_store.config.model_dump_json(exclude_none=True))
    ctx = HubContext(build_config({**data, **extra}), hub_store.sessions, hub_store.blobs)
    return Hub(ctx, TestClient(create_app(ctx)), [])


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_registry_and_admin_actions(hub_store: Any, sample_factory: Any, tmp_path: Path,
                                    mosquitto_broker: Any) -> None:
    hub = _hub(hub_store, sample_factory, tmp_path,
               {"mqtt": {"url": f"mqtt://127.0.0.1:{mosquitto_broker.port}"},
                "rollout": {"public_url": "https://hub.example:8443", "canary_share": 0.5},
                "retrain": {"golden": str(tmp_path / "golden")}})
    vera, ada = hub.login("vera"), hub.login("ada")
    page = vera.get("/models").text
    assert re.search(r'data-version="1.1.0">.*?candidate.*?passed', page, re.S)
    assert "/api/v1/retrain/jobs/20261123T000000-1-abcd/report/confusion.png" in page
    assert "No retraining job yet." in page and "Retrain now" not in page and "/models/1.1.0/canary" not in page
    page = ada.get("/models").text
    assert "/models/1.1.0/canary" in page and "Retrain now" in page
    token = hub.csrf(ada)
    assert ada.post("/models/1.1.0/canary", data={}, follow_redirects=False).status_code == 403  # no CSRF token
    r = ada.post("/models/1.1.0/canary", data={"csrf_token": token}, follow_redirects=True)
    assert "1.1.0: canary announced to 2 stations" in r.text, r.text
    with hub.ctx.sessions() as s:
        assert get(s, "1.1.0").status == "canary"
    r = ada.post("/models/1.1.0/rollback", data={"csrf_token": token, "reason": "looks off"}, follow_redirects=True)
    assert "1.1.0: rollback announced to 2 stations" in r.text
    with hub.ctx.sessions() as s:
        assert get(s, "1.1.0").status == "rejected"
    r = ada.post("/models/1.1.0/promote", data={"csrf_token": token}, follow_redirects=True)
    assert "rejected" in r.text and 'role="alert"' in r.text  # a rejected version stays rejected
    assert vera.post("/models/1.0.0/promote", data={"csrf_token": hub.csrf(vera)}).status_code == 403


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_actions_without_a_rollout_section_say_so(hub_store: Any, sample_factory: Any, tmp_path: Path) -> None:
    hub = _hub(hub_store, sample_factory, tmp_path, {})
    ada = hub.login("ada")
    page = ada.get("/models").text
    assert "/models/1.1.0/canary" not in page and "Retraining" not in page
    r = ada.post("/models/1.1.0/canary", data={"csrf_token": hub.csrf(ada)}, follow_redirects=True)
    assert "no rollout section" in r.text
