"""The model registry on SQLite and PostgreSQL: registration, the status rules, one production
version at a time, and the audit trail."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from hub.core.db import make_engine, make_session_factory, upgrade
from hub.registry import RegistryError, get, list_versions, production, register, set_status
from hub.tables import ModelEvent
from models.bundle import write_bundle


@pytest.fixture
def session(db_url: str) -> Iterator[Session]:
    upgrade(db_url)
    engine = make_engine(db_url)
    s = make_session_factory(engine)()
    try:
        yield s
    finally:
        s.close()
        engine.dispose()


def bundle(tmp_path: Path, version: str, parent: str | None = None) -> Path:
    src = tmp_path / f"{version}.onnx"
    src.write_bytes(np.random.default_rng(len(version)).bytes(1000))
    out = tmp_path / f"b-{version}"
    write_bundle(out, name="t", version=version, parent_version=parent, classes=["a"], input_size=(32, 32),
                 files={"onnx_int8": src}, metrics={"map50": 0.9})
    return out


def test_register_promote_retire_and_audit(session: Session, tmp_path: Path) -> None:
    first = register(session, bundle(tmp_path, "1.0.0"), actor="admin", status="production")
    assert first.status == "production" and first.metrics == {"map50": 0.9}
    c = register(session, bundle(tmp_path, "1.1.0", "1.0.0"), actor="retrain", data_snapshot=[5, 3, 9])
    assert (c.status, c.parent_version, c.data_snapshot) == ("candidate", "1.0.0", [3, 5, 9])
    set_status(session, "1.1.0", "canary", actor="gate", reason="passed the gate")
    promoted = set_status(session, "1.1.0", "production", actor="alice", reason="canary healthy")
    session.commit()
    assert promoted.promoted_by == "alice"
    assert production(session).version == "1.1.0"  # type: ignore[union-attr]
    assert get(session, "1.0.0").status == "retired"
    assert [m.version for m in list_versions(session)] == ["1.0.0", "1.1.0"]
    # a manual rollback: the retired version becomes production again, the other one retired
    set_status(session, "1.0.0", "production", actor="bob", reason="rollback")
    session.commit()
    assert (get(session, "1.0.0").status, get(session, "1.1.0").status) == ("production", "retired")
    events = session.scalars(select(ModelEvent).order_by(ModelEvent.id)).all()
    assert [(e.status_before, e.status_after, e.actor) for e in events] == [
        (None, "production", "admin"), (None, "candidate", "retrain"), ("candidate", "canary", "gate"),
        ("production", "retired", "alice"), ("canary", "production", "alice"),
        ("production", "retired", "bob"), ("retired", "production", "bob")]


@pytest.mark.parametrize(("path", "to", "error"), [
    ([], "retired", "promote another version to retire it"),  # production cannot just be retired
    (["rejected"], "canary", "rejected -> canary is not allowed"),
    (["canary"], "candidate", "canary -> candidate is not allowed"),
    ([], "shipped", "unknown status"),
])
def test_forbidden_changes(session: Session, tmp_path: Path, path: list[str], to: str, error: str) -> None:
    register(session, bundle(tmp_path, "1.0.0"), actor="a", status="production")
    v = "1.1.0"
    register(session, bundle(tmp_path, v), actor="a")
    for step in path:
        set_status(session, v, step, actor="a", reason="")
    target = "1.0.0" if to == "retired" else v
    with pytest.raises(RegistryError, match=error):
        set_status(session, target, to, actor="a", reason="")


def test_registration_rules(session: Session, tmp_path: Path) -> None:
    b = bundle(tmp_path, "1.0.0")
    register(session, b, actor="a", status="production")
    with pytest.raises(RegistryError, match="already registered"):
        register(session, b, actor="a")
    with pytest.raises(RegistryError, match="production version already"):
        register(session, bundle(tmp_path, "1.2.0"), actor="a", status="production")
    with pytest.raises(RegistryError, match="starts as candidate"):
        register(session, bundle(tmp_path, "1.3.0"), actor="a", status="canary")
    (b / "model_int8.onnx").write_bytes(b"changed")
    with pytest.raises(Exception, match="sha256|bytes"):
        register(session, b, actor="a")  # the files no longer match the manifest


def test_models_cli(db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from hub.cli import main

    common = ["--data-dir", str(tmp_path / "hub"), "--database", db_url]
    assert main(["models", "register", str(bundle(tmp_path, "1.0.0")), "--production", *common]) == 0
    assert main(["models", "register", str(bundle(tmp_path, "1.1.0", "1.0.0")), *common]) == 0
    assert main(["models", "reject", "1.0.0", *common]) == 2
    assert "production -> rejected is not allowed" in capsys.readouterr().err
    assert main(["models", "promote", "1.1.0", "--actor", "alice", *common]) == 0
    assert main(["models", "list", *common]) == 0
    out = capsys.readouterr().out
    assert "1.0.0        retired" in out and "1.1.0        production" in out and "promoted by alice" in out
