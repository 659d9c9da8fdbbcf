"""A retraining job's settings, its state file, its lock and its version number (:mod:`hub.retrain`)."""

from __future__ import annotations

import fcntl
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from hub.gate import GateRule

__all__ = ["JobState", "RetrainBusy", "RetrainError", "RetrainSettings", "job_lock", "next_version", "now",
           "split_parts_decision"]


class RetrainError(RuntimeError):
    """A job that cannot go on; the message says which step and why."""


class RetrainBusy(RetrainError):
    """Another retraining job holds the lock."""


@dataclass(frozen=True)
class RetrainSettings:
    golden: Path  # a dataset directory with a val split; never changes between retrainings
    bundles_dir: Path  # new bundles are written to bundles_dir/<version>
    signing_key: Path | None  # Ed25519 private key (PEM)
    replay_data: Path | None = None
    replay_images: int = 600
    replay_val_images: int | None = None  # replay frames in validation; None: a quarter of replay_images
    reviewed_repeats: int = 1  # each reviewed training frame placed this many times
    preset: str = "auto"  # auto: "retrain" with a GPU, "retrain-cpu" without (see resolve_preset)
    epochs: int | None = None
    hours: float | None = None
    device: str | None = None
    workers: int | None = None  # data loader workers; None: by cores (RetrainJob.loader_workers)
    val_share: float = 0.2
    min_reviewed: int = 1
    score_workers: int | None = None  # processes for the release and gate scoring passes; None: by cores
    calib_images: int = 100  # INT8 calibration frames (the gate scores the INT8 model that results)
    split_retune_steps: int = 200  # bottleneck fine-tuning when training changed the device's layers; 0: refuse
    split_parts: str = "auto"  # auto | always | never: see split_parts_decision
    rule: GateRule = field(default_factory=GateRule)


@dataclass
class JobState:
    job_id: str
    trigger: str  # manual | schedule
    requested_by: str
    status: str = "queued"  # queued | running | succeeded | rejected | failed
    step: str | None = None
    steps_done: list[str] = field(default_factory=list)
    created_at: str = ""
    started_at: str | None = None
    finished_at: str | None = None
    production_version: str | None = None
    candidate_version: str | None = None
    gate_passed: bool | None = None
    gate_reasons: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    error: str | None = None

    @classmethod
    def read(cls, path: Path) -> JobState:
        return cls(**json.loads(path.read_text()))


def split_parts_decision(policy: str, fleet_split: bool | None) -> tuple[bool, str]:
    """Whether the job builds split parts for its candidate (when production has them), and why.
    ``fleet_split``: :func:`hub.fleet.fleet_runs_split`. ``auto`` leaves them out only when every
    agent heard from recently reported full mode: a fleet the hub knows nothing about may be split."""
    if policy == "never":
        return False, "retrain.split_parts is never"
    if policy == "always":
        return True, "retrain.split_parts is always"
    if policy != "auto":
        raise ValueError(f"split_parts must be auto, always or never, got {policy!r}")
    from hub.fleet import SPLIT_WINDOW

    days = SPLIT_WINDOW.days
    if fleet_split is False:
        return False, f"every agent heard from in the last {days} days runs full mode"
    return True, ("an agent runs split mode" if fleet_split else
                  f"no agent heard from in the last {days} days, or one has not reported its mode")


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def next_version(versions: list[str]) -> str:
    """Minor + 1 over the highest ``MAJOR.MINOR.PATCH`` in ``versions``."""
    parsed = [tuple(int(p) for p in v.split(".")) for v in versions]
    major, minor, _ = max(parsed) if parsed else (1, -1, 0)
    return f"{major}.{minor + 1}.0"


@contextmanager
def job_lock(lock: Path) -> Iterator[None]:
    """Hold the one-job-at-a-time lock; :class:`RetrainBusy` when another process holds it."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            raise RetrainBusy(f"another retraining job holds {lock}") from e
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
