"""The retraining scheduler runs `lineguard-hub retrain` as a child process; a job that cannot
run says why in its state and in the exit code."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import yaml

from hub.core.config import load_config
from hub.retrain_worker import RetrainScheduler, jobs_root


def _config(tmp_path: Path) -> Path:
    cfg = tmp_path / "hub.yaml"
    cfg.write_text(yaml.safe_dump({"data_dir": str(tmp_path / "hub"), "mqtt": {"url": "mqtt://127.0.0.1:1"},
                                   "retrain": {"golden": str(tmp_path / "golden"), "schedule": "0 2 * * mon",
                                               "min_reviewed": 1}}))
    return cfg


def test_scheduled_run_without_a_production_model_fails_and_says_why(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    config = load_config(cfg)
    sched = RetrainScheduler(config)
    assert sched.schedule.next_after(datetime(2026, 11, 23, 3, 0, tzinfo=UTC)) == datetime(2026, 11, 30, 2, 0,
                                                                                           tzinfo=UTC)
    assert sched.run_once() == 1  # a child process: `lineguard-hub retrain --trigger schedule ...`
    (state,) = jobs_root(config).glob("*/state.json")
    st = json.loads(state.read_text())
    assert st["status"] == "failed" and st["trigger"] == "schedule" and st["step"] == "snapshot"
    assert "no production model" in st["error"]
    assert sched.runs == [1]


def test_scheduler_stops_promptly(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    sched = RetrainScheduler(load_config(cfg))
    sched.start()
    t0 = datetime.now(UTC)
    sched.stop()
    assert (datetime.now(UTC) - t0).total_seconds() < 5 and sched.runs == []  # nothing was due


def test_settings_carry_the_job_tuning_keys(tmp_path: Path) -> None:
    from hub.core.config import build_config
    from hub.retrain_worker import settings_from_config

    cfg = build_config({"data_dir": str(tmp_path / "hub"), "retrain": {
        "golden": str(tmp_path / "golden"), "calib_images": 64, "score_workers": 3, "split_retune_steps": 0,
        "replay_val_images": 300, "reviewed_repeats": 3}})
    st = settings_from_config(cfg)
    assert (st.calib_images, st.score_workers, st.split_retune_steps, st.replay_val_images,
            st.reviewed_repeats) == (64, 3, 0, 300, 3)
    assert st.bundles_dir == tmp_path / "hub" / "bundles"
