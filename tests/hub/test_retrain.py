"""Retraining at CI scale: reviewed samples in the hub database (a new defect class among them)
-> dataset with a replay buffer -> training from the production checkpoint -> INT8 bundle ->
gate -> signature -> registry. A failing gate never signs; a job resumes after its process dies."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import yaml

pytest.importorskip("ultralytics")

from hub.gate import GateRule  # noqa: E402
from hub.registry import get, list_versions, register  # noqa: E402
from hub.retrain import STEPS, RetrainBusy, RetrainJob, RetrainSettings, job_lock, next_version  # noqa: E402
from hub.review import Box, add_class, apply_review  # noqa: E402
from hub.tables import Sample, User  # noqa: E402
from models.bundle import load_bundle  # noqa: E402
from models.signing import generate_keypair, load_public_keys, verify_bundle  # noqa: E402
from models.taxonomy import DEFAULT_CLASSES  # noqa: E402

pytestmark = pytest.mark.slow


def _dataset(root: Path, splits: dict[str, int], seed: int) -> Path:
    names = list(DEFAULT_CLASSES)
    rng = np.random.default_rng(seed)
    for split, n in splits.items():
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i in range(n):
            img = np.full((160, 160, 3), 120, np.uint8)
            c = int(rng.integers(0, len(names)))
            x, y = (int(v) for v in rng.integers(20, 120, 2))
            cv2.rectangle(img, (x, y), (x + 24, y + 16), (40 * c, 200 - 40 * c, 90), -1)
            cv2.imwrite(str(root / "images" / split / f"{split}{i:03d}.jpg"), img)
            (root / "labels" / split / f"{split}{i:03d}.txt").write_text(
                f"{c} {(x + 12) / 160:.5f} {(y + 8) / 160:.5f} {24 / 160:.5f} {16 / 160:.5f}\n")
    (root / "data.yaml").write_text(yaml.safe_dump({"path": str(root), **{s: f"images/{s}" for s in splits},
                                                    "names": dict(enumerate(names))}))
    return root


@pytest.fixture(scope="module")
def production_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from models import quantize as q
    from models.checkpoint import make_dev_checkpoint
    from models.export import build_bundle

    os.environ.setdefault("YOLO_CONFIG_DIR", str(tmp_path_factory.mktemp("yolo_cfg")))
    root = tmp_path_factory.mktemp("prod")
    ds = _dataset(root / "ds", {"train": 6, "val": 3}, seed=1)
    ckpt = make_dev_checkpoint(root / "dev.pt", bn_frames=q.load_frames(q.list_dataset_images(ds)[:4]), imgsz=160)
    build_bundle(ckpt, root / "1.0.0", ds, version="1.0.0", imgsz=160, calib_images=4, sensitivity_frames=2)
    return root / "1.0.0"


def _reviewed_hub(hub_store: Any, sample_factory: Any, production_bundle: Path) -> Any:
    """14 samples, 13 reviewed (confirmed with boxes of old classes and of the new class burr, or
    rejected), 1 left unreviewed; production = the dev bundle 1.0.0."""
    hub_store.add_users("pw-long-enough-1", rita="reviewer")
    # fixed sample ids: the export's train/val split (a hash of the id) is then fixed too
    hub_store.ingest([sample_factory(seed=i, n_dets=1, sample_id=str(uuid.UUID(int=i + 1))) for i in range(14)])
    with hub_store.sessions.begin() as s:
        register(s, production_bundle, actor="test", status="production")
        for name in DEFAULT_CLASSES:
            if name != "scratch":  # scratch is known from the samples' detections
                add_class(s, name, by="rita")
        add_class(s, "burr", by="rita")  # a defect class the production model never saw
        uid = s.query(User).filter_by(username="rita").one().id
        for k, smp in enumerate(s.query(Sample).order_by(Sample.id).all()):
            if k == 13:
                continue  # stays unreviewed: not trained on
            if k % 4 == 3:
                apply_review(s, smp, user_id=uid, username="rita", action="reject")
            else:
                cls = "burr" if k % 2 else DEFAULT_CLASSES[k % len(DEFAULT_CLASSES)]
                apply_review(s, smp, user_id=uid, username="rita", action="confirm",
                             boxes=[Box(cls, 8.0, 6.0, 40.0, 30.0)])
    return hub_store


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_retrain_gate_sign_register(hub_store: Any, sample_factory: Any, production_bundle: Path,
                                   tmp_path: Path) -> None:
    _reviewed_hub(hub_store, sample_factory, production_bundle)
    priv, pub = generate_keypair(tmp_path / "keys")
    golden = _dataset(tmp_path / "golden", {"val": 4}, seed=2)
    replay = _dataset(tmp_path / "replay", {"train": 8, "val": 4}, seed=3)

    def settings(rule: GateRule) -> RetrainSettings:
        return RetrainSettings(golden=golden, bundles_dir=tmp_path / "bundles", signing_key=priv, replay_data=replay,
                               replay_images=8, replay_val_images=3, preset="retrain-ci", workers=0, rule=rule,
                               val_share=0.5,
                               epochs=2)  # 2: an epoch logged before the last one (no validation in either)

    root = tmp_path / "jobs"
    # 1. an impossible rule: the candidate is built, scored, registered as rejected, never signed
    seen: list[str] = []
    job = RetrainJob.create(root, settings(GateRule(min_new_data_gain=1.0)), hub_store.sessions, hub_store.blobs,
                            on_step=lambda st: seen.append(st.step or ""))
    from ultralytics.models.yolo.detect import DetectionValidator

    validations: list[int] = []
    real_call = DetectionValidator.__call__

    def counting(self: Any, *a: Any, **k: Any) -> Any:
        validations.append(1)
        return real_call(self, *a, **k)

    DetectionValidator.__call__ = counting  # type: ignore[method-assign]
    try:
        st = job.run()
    finally:
        DetectionValidator.__call__ = real_call  # type: ignore[method-assign]
    assert validations == []  # the preset skips every validation of Ultralytics: the release step scores val
    assert st.status == "rejected" and st.gate_passed is False and st.steps_done == list(STEPS), st
    assert st.candidate_version == "1.1.0" and st.production_version == "1.0.0"
    assert "does not beat production" in st.gate_reasons[0]
    assert [s for s in dict.fromkeys(seen) if s] == list(STEPS)
    rejected = tmp_path / "bundles" / "1.1.0"
    assert not (rejected / "manifest.sig").exists()
    with hub_store.sessions() as s:
        info = get(s, "1.1.0")
        assert info.status == "rejected" and info.parent_version == "1.0.0"
        assert len(info.data_snapshot) == 13  # the reviewed samples, not the unreviewed one
    trained = Path(json.loads((job.work / "train.json").read_text())["checkpoint"])
    assert trained.is_file() and trained.parent.parent.parent == job.work / "runs"  # trained here, from 1.0.0
    import torch

    assert torch.load(trained, map_location="cpu", weights_only=False)["optimizer"] is None  # stripped all the same
    results = (trained.parent.parent / "results.csv").read_text().splitlines()
    assert len(results) == 3 and "nan" in results[2] and "nan" not in results[1]  # the last epoch: not measured
    data = json.loads((job.work / "dataset.json").read_text())
    assert data["names"] == [*DEFAULT_CLASSES, "burr"]  # the new class takes the next id
    assert (job.work / "start.pt").is_file()  # the class head was widened before training
    assert data["counts"]["replay"] == {"train": 8, "val": 3} and sum(data["counts"]["reviewed"].values()) == 13
    assert not any(data["counts"]["golden_left_out"].values())  # golden and replay: two datasets
    # the preset trains on crops of the training frames (beside them: the release calibrates on frames)
    train_frames = data["counts"]["replay"]["train"] + data["counts"]["reviewed"]["train"]
    assert data["counts"]["crops"]["frames"] == train_frames <= data["counts"]["crops"]["crops"]
    assert yaml.safe_load((job.work / "train_data" / "data.yaml").read_text())["train"] == "images/train_crops"
    assert len(list((job.work / "train_data" / "images" / "train").iterdir())) == train_frames
    m = load_bundle(rejected, roles=("onnx_int8",)).manifest
    assert list(m.classes) == [*DEFAULT_CLASSES, "burr"] and list(m.input_size) == [160, 160]
    gate = json.loads((job.work / "gate" / "gate.json").read_text())
    assert gate["candidate"] == "1.1.0" and gate["new_data"] is not None
    snap = json.loads((job.work / "snapshot.json").read_text())
    assert snap["split_parts"] is True and "no agent heard from" in snap["split_parts_reason"]  # no fleet yet
    # golden set: the old classes' boxes, and the new class kept as a column (what it took for itself)
    g_c, g_p = gate["golden"]["candidate"], gate["golden"]["production"]
    assert g_c["names"] == [*DEFAULT_CLASSES, "burr"] and g_p["names"] == list(DEFAULT_CLASSES)
    assert len(g_c["confusion"]) == len(DEFAULT_CLASSES) + 2 and len(g_p["confusion"]) == len(DEFAULT_CLASSES) + 1
    assert g_c["recall_at_operating"]["burr"] is None  # the golden set has no burr
    assert (job.work / "gate" / "confusion.png").stat().st_size > 1000

    # 2. a permissive rule: signed with the hub's key, registered as a candidate, next version
    st2 = RetrainJob.create(root, settings(GateRule(max_recall_drop=1.0, min_new_data_gain=-1.0,
                                                  max_false_alarm_rise=None)),
                            hub_store.sessions, hub_store.blobs).run()
    assert st2.status == "succeeded" and st2.candidate_version == "1.2.0", st2
    # golden-set detections cached per model: production's predicted once (job 1) and read back in
    # job 2; each candidate's kept for the week it becomes production
    assert len(list((tmp_path / "bundles" / ".detections").glob("*.npz"))) == 3
    gate2 = json.loads((tmp_path / "jobs" / st2.job_id / "gate" / "gate.json").read_text())
    assert gate2["golden"]["production"] == gate["golden"]["production"]
    verify_bundle(tmp_path / "bundles" / "1.2.0", load_public_keys([pub]))
    with hub_store.sessions() as s:
        assert [(v.version, v.status) for v in list_versions(s)] == [
            ("1.0.0", "production"), ("1.1.0", "rejected"), ("1.2.0", "candidate")]
    assert RetrainJob.unfinished(root) == []


def test_one_job_at_a_time(tmp_path: Path) -> None:
    with job_lock(tmp_path / ".lock"), pytest.raises(RetrainBusy, match="another retraining job"), \
            job_lock(tmp_path / ".lock"):
        pass
    with job_lock(tmp_path / ".lock"):  # released
        pass


@pytest.mark.parametrize(("configured", "gpu", "cpus", "expected"), [
    (None, True, 16, 8), (None, True, 64, 8), (None, True, 6, 6), (None, False, 16, 2), (None, False, 2, 2),
    (4, True, 16, 4), (0, False, 2, 0)])
def test_loader_workers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, configured: int | None, gpu: bool,
                        cpus: int, expected: int) -> None:
    job = RetrainJob.create(tmp_path, RetrainSettings(golden=tmp_path, bundles_dir=tmp_path, signing_key=None,
                                                      workers=configured), None, None)  # type: ignore[arg-type]
    monkeypatch.setattr(os, "cpu_count", lambda: cpus)
    monkeypatch.setattr(job, "_on_gpu", lambda: gpu)
    assert job.loader_workers() == expected


@pytest.mark.parametrize(("policy", "fleet_split", "built", "error"), [
    ("auto", None, True, None),      # nothing known of the fleet: it may be split
    ("auto", True, True, None),
    ("auto", False, False, None),    # every agent heard from runs full mode
    ("always", False, True, None),
    ("never", True, False, None),
    ("sometimes", None, None, "auto, always or never"),
])
def test_split_parts_decision(policy: str, fleet_split: bool | None, built: bool | None, error: str | None) -> None:
    from hub.retrain_state import split_parts_decision

    if error:
        with pytest.raises(ValueError, match=error):
            split_parts_decision(policy, fleet_split)
    else:
        assert split_parts_decision(policy, fleet_split)[0] is built


def test_the_split_step_follows_the_snapshots_decision(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A split production (the shipped bundle) and a snapshot that decided against split parts:
    the step builds none (it would need the candidate's bundle and checkpoint otherwise)."""
    job = RetrainJob.create(tmp_path, RetrainSettings(golden=tmp_path, bundles_dir=tmp_path, signing_key=None,
                                                      split_parts="never"), None, None)  # type: ignore[arg-type]
    (job.work / "snapshot.json").write_text(json.dumps({
        "production_bundle": str(Path(__file__).resolve().parents[2] / "models" / "default"),
        "split_parts": False, "split_parts_reason": "retrain.split_parts is never"}))
    with caplog.at_level("INFO", logger="hub.retrain"):
        job._step_split()
    assert "no split parts for the candidate (retrain.split_parts is never)" in caplog.text
    assert job._start_bottleneck_prep(json.loads((job.work / "snapshot.json").read_text()), None) is None


@pytest.mark.parametrize(("versions", "expected"), [([], "1.0.0"), (["1.0.0"], "1.1.0"),
                                                    (["1.2.0", "1.10.0", "1.9.3"], "1.11.0"), (["2.0.1"], "2.1.0")])
def test_next_version(versions: list[str], expected: str) -> None:
    assert next_version(versions) == expected


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_kill_9_mid_training_resumes_the_same_job(hub_store: Any, sample_factory: Any, production_bundle: Path,
                                                 tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys
    import time

    from hub.core.config import load_config
    from hub.retrain_worker import jobs_root, run_retrain

    _reviewed_hub(hub_store, sample_factory, production_bundle)
    priv, pub = generate_keypair(tmp_path / "keys")
    cfg = tmp_path / "hub.yaml"
    cfg.write_text(yaml.safe_dump({
        "data_dir": str(hub_store.config.data_dir), "database_url": hub_store.config.db_url,
        "mqtt": {"url": "mqtt://127.0.0.1:1"},
        "retrain": {"golden": str(_dataset(tmp_path / "golden", {"val": 4}, seed=2)),
                    "replay_data": str(_dataset(tmp_path / "replay", {"train": 8, "val": 4}, seed=3)),
                    "replay_images": 8, "preset": "retrain-ci", "workers": 0, "min_reviewed": 1, "val_share": 0.5,
                    "signing_key_file": str(priv), "max_recall_drop_points": 100, "min_new_data_gain_points": -100}}))
    root = jobs_root(load_config(cfg))
    proc = subprocess.Popen([sys.executable, "-m", "hub.cli", "retrain", "-c", str(cfg), "--no-progress"],
                            cwd=Path(__file__).resolve().parents[2], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    state = None
    while time.monotonic() < deadline:
        states = list(root.glob("*/state.json")) if root.exists() else []
        if states and json.loads(states[0].read_text()).get("step") == "train":
            state = states[0]
            break
        assert proc.poll() is None, "the job ended before training started"
        time.sleep(0.05)
    assert state is not None, "training never started"
    time.sleep(1.0)  # inside the training
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = json.loads(state.read_text())
    assert before["status"] == "running" and before["steps_done"] == ["snapshot", "dataset"], before
    dataset_mtime = (state.parent / "dataset.json").stat().st_mtime_ns

    st = run_retrain(load_config(cfg), progress=False)  # what `lineguard-hub retrain` or serve's scheduler does next
    assert st.job_id == before["job_id"] and st.status == "succeeded" and st.steps_done == list(STEPS), st
    assert (state.parent / "dataset.json").stat().st_mtime_ns == dataset_mtime  # finished steps are not redone
    verify_bundle(hub_store.config.data_dir / "bundles" / st.candidate_version, load_public_keys([pub]))
    assert RetrainJob.unfinished(root) == []


def test_cli_without_a_retrain_section_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from hub.cli import main

    assert main(["retrain", "--data-dir", str(tmp_path)]) == 2
    assert "no retrain section" in capsys.readouterr().err


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_gate_passes_run_while_the_release_waits_for_the_split_bottleneck(
        hub_store: Any, sample_factory: Any, production_bundle: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """On a GPU hub the release waits for the bottleneck's fine-tuning process (a stand-in here):
    the gate's whole-model passes are queued on the scoring pool first, and the gate takes them up."""
    import logging

    _reviewed_hub(hub_store, sample_factory, production_bundle)
    replay = _dataset(tmp_path / "replay", {"train": 8, "val": 4}, seed=3)
    settings = RetrainSettings(golden=_dataset(tmp_path / "golden", {"val": 4}, seed=2), bundles_dir=tmp_path / "b",
                               signing_key=None, replay_data=replay,
                               replay_images=8, preset="retrain-ci", workers=0, score_workers=2, val_share=0.5,
                               rule=GateRule(min_new_data_gain=1.0))
    job = RetrainJob.create(tmp_path / "jobs", settings, hub_store.sessions, hub_store.blobs)
    waited: list[bool] = []

    class Prep:  # the bottleneck's process: the release joins it after queuing the gate's passes
        exitcode = 0

        def submit(self, checkpoint: Path) -> None:
            pass

        def join(self) -> None:
            waited.append((job.work / "prefetch" / "manifest.json").is_file())

        def cancel(self) -> None:
            pass

    monkeypatch.setattr(job, "_start_bottleneck_prep", lambda snap, ckpt: Prep())
    from hub.gate_scoring import GateScorer

    calls: list[list[str]] = []
    real = GateScorer._predict

    def counting(self: Any, jobs: Any) -> Any:  # the passes the gate runs itself
        calls.append([str(m) for m, _ in jobs])
        return real(self, jobs)

    monkeypatch.setattr(GateScorer, "_predict", counting)
    import models.dataset_io

    loads: list[Path] = []
    real_load = models.dataset_io.load_dataset

    def load_counting(root: Path, *a: Any, **k: Any) -> Any:
        loads.append(Path(root))
        return real_load(root, *a, **k)

    monkeypatch.setattr(models.dataset_io, "load_dataset", load_counting)
    with caplog.at_level(logging.INFO, logger="hub"):
        st = job.run()
    assert st.steps_done == list(STEPS) and st.status == "rejected", st
    assert loads.count(Path(settings.golden)) == 1  # read once for the queued passes and the gate
    assert waited == [True]  # the release's snapshot for the queued passes was there while it waited
    # golden set: candidate and production (no cache yet); reviewed data: both
    assert "4 gate passes queued" in caplog.text and "4 whole-model passes were queued early" in caplog.text
    assert calls == []  # the gate ran no pass of its own (this production has no split parts)
    assert not (job.work / "prefetch").exists()
    gate = json.loads((job.work / "gate" / "gate.json").read_text())
    assert gate["golden"]["candidate"]["map50"] >= 0 and gate["new_data"] is not None


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize(("reviewed", "replay_val", "error"), [
    (1, 0, "no validation images: no reviewed sample is on the validation side"),  # one reviewed, hashed to train
    (1, 4, None),   # the replay data's val split validates
    (2, 0, None),   # two reviewed, both hashed to train: the export moves one to val
])
def test_the_dataset_step_refuses_a_job_with_no_validation_images(
        hub_store: Any, sample_factory: Any, tmp_path: Path, reviewed: int, replay_val: int, error: str | None) -> None:
    from hub.retrain import RetrainError
    from tests.hub.conftest import reject_samples, sample_ids_on_sides

    reject_samples(hub_store, sample_factory, sample_ids_on_sides(0, reviewed, 0.2))
    replay = _dataset(tmp_path / "replay", {"train": 4, "val": replay_val}, seed=1) if replay_val else None
    settings = RetrainSettings(golden=_dataset(tmp_path / "golden", {"val": 2}, seed=2), bundles_dir=tmp_path,
                               signing_key=None, replay_data=replay, replay_images=4, replay_val_images=replay_val,
                               preset="retrain")
    job = RetrainJob.create(tmp_path / "jobs", settings, hub_store.sessions, hub_store.blobs)
    (job.work / "snapshot.json").write_text(json.dumps({"classes": list(DEFAULT_CLASSES), "input_size": [160, 160]}))
    if error is None:
        job._step_dataset()
        assert len(list((job.work / "train_data" / "images" / "val").glob("*.jpg"))) == (replay_val or 1)
    else:
        with pytest.raises(RetrainError, match=error):
            job._step_dataset()
