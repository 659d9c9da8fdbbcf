"""Running retraining jobs: from the CLI (foreground, progress bar) and on the hub's schedule.

``lineguard-hub retrain`` first resumes a job a crash left unfinished, else starts a new one, and
runs it in the foreground with a progress bar over the steps. ``serve`` with a ``retrain``
section starts :class:`RetrainScheduler`: a thread that, at each time the cron expression names
(UTC), runs ``lineguard-hub retrain`` as a child process, so training never runs inside the web
server's process, let alone in a request. At start it resumes an unfinished job the same way.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path

import yaml

from hub.core.config import HubConfig
from hub.gate import GateRule
from hub.retrain import STEPS, JobState, RetrainJob, RetrainSettings
from hub.schedule import CronSchedule

__all__ = ["RetrainScheduler", "jobs_root", "run_retrain", "settings_from_config", "spawn_retrain"]

log = logging.getLogger(__name__)


def jobs_root(config: HubConfig) -> Path:
    return config.data_dir / "retrain"


def settings_from_config(config: HubConfig) -> RetrainSettings:
    rc = config.retrain
    if rc is None:
        raise ValueError("the hub config has no retrain section")
    env_key = os.environ.get("LINEGUARD_SIGNING_KEY_FILE")
    key = rc.signing_key_file or (Path(env_key) if env_key else None)
    return RetrainSettings(golden=rc.golden, bundles_dir=config.data_dir / "bundles", signing_key=key,
                           replay_data=rc.replay_data, replay_images=rc.replay_images,
                           replay_val_images=rc.replay_val_images, reviewed_repeats=rc.reviewed_repeats,
                           preset=rc.preset,
                           epochs=rc.epochs, hours=rc.hours, device=rc.device, workers=rc.workers,
                           val_share=rc.val_share, min_reviewed=rc.min_reviewed, score_workers=rc.score_workers,
                           calib_images=rc.calib_images, split_retune_steps=rc.split_retune_steps,
                           split_parts=rc.split_parts,
                           rule=GateRule(max_recall_drop=rc.max_recall_drop_points / 100,
                                         min_new_data_gain=rc.min_new_data_gain_points / 100,
                                         max_false_alarm_rise=None if rc.max_false_alarm_rise_points is None
                                         else rc.max_false_alarm_rise_points / 100,
                                         max_split_map50_drop=None if rc.max_split_map50_drop_points is None
                                         else rc.max_split_map50_drop_points / 100))


def spawn_retrain(config: HubConfig, *, trigger: str, requested_by: str) -> subprocess.Popen[bytes]:
    """``lineguard-hub retrain`` as a child process with exactly this hub's configuration (written to
    ``<data_dir>/retrain/.config.yaml``; it holds no secrets: those come from the environment)."""
    root = jobs_root(config)
    root.mkdir(parents=True, exist_ok=True)
    cfg, tmp = root / ".config.yaml", root / ".config.yaml.tmp"
    tmp.write_text(yaml.safe_dump(json.loads(config.model_dump_json(exclude_none=True))))
    tmp.replace(cfg)
    return subprocess.Popen([sys.executable, "-m", "hub.cli", "retrain", "-c", str(cfg), "--no-progress",
                             "--trigger", trigger, "--by", requested_by],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def run_retrain(config: HubConfig, *, trigger: str = "manual", requested_by: str = "cli",
                progress: bool = True) -> JobState:
    """Resume the unfinished job if there is one, else run a new one. :class:`RetrainBusy` when
    another process is running a job."""
    from tqdm import tqdm

    from hub.blobs import FileBlobStore
    from hub.core.db import make_engine, make_session_factory, upgrade

    settings = settings_from_config(config)
    engine = make_engine(config.db_url)
    upgrade(engine)
    sessions = make_session_factory(engine, immediate=True)  # SQLite: writes beside the ingest worker's
    blobs = FileBlobStore(config.blob_dir)
    root = jobs_root(config)
    bar = tqdm(total=len(STEPS), desc="retrain", unit="step", disable=not progress)

    def on_step(st: JobState) -> None:
        bar.n = len(st.steps_done)
        bar.set_postfix_str(st.step or "")
        bar.refresh()

    try:
        unfinished = RetrainJob.unfinished(root) if root.exists() else []
        if unfinished:
            log.info("resuming retraining job %s", unfinished[0].name)
            job = RetrainJob(unfinished[0], settings, sessions, blobs, on_step=on_step)
        else:
            job = RetrainJob.create(root, settings, sessions, blobs, trigger=trigger, requested_by=requested_by,
                                    on_step=on_step)
        return job.run()
    finally:
        bar.close()
        engine.dispose()


class RetrainScheduler:
    """``start()``/``stop()``; runs ``lineguard-hub retrain`` at each time of the cron schedule."""

    def __init__(self, config: HubConfig) -> None:
        assert config.retrain is not None and config.retrain.schedule is not None
        self.config = config
        self.schedule = CronSchedule.parse(config.retrain.schedule)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="retrain-scheduler", daemon=True)
        self.runs: list[int] = []  # exit codes of the jobs run

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def run_once(self) -> int:
        returncode = spawn_retrain(self.config, trigger="schedule", requested_by="schedule").wait()
        self.runs.append(returncode)
        log.log(logging.INFO if returncode in (0, 3) else logging.ERROR,
                "scheduled retraining finished with exit code %d", returncode)
        return returncode

    def _loop(self) -> None:
        root = jobs_root(self.config)
        if root.exists() and RetrainJob.unfinished(root):
            log.info("an unfinished retraining job is left from before: resuming it")
            self.run_once()
        while not self._stop.is_set():
            now = datetime.now(UTC)
            due = self.schedule.next_after(now)
            log.info("next scheduled retraining at %s", due.isoformat())
            if self._stop.wait((due - now).total_seconds()):
                return
            self.run_once()

