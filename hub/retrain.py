"""Retraining (issue 6): from the reviewed samples to a gated, signed, registered candidate bundle.

A job is a directory under ``<data_dir>/retrain/<job id>/`` holding ``state.json`` (written
atomically after every step) and every step's output, so that a job killed at any point resumes
where it stopped: finished steps are skipped, training continues from Ultralytics' ``last.pt``.
One job runs at a time (an exclusive ``flock`` on ``<data_dir>/retrain/.lock``; a second runner
gets :class:`RetrainBusy`). Steps:

1. ``snapshot``: the production model and the reviewed samples (confirmed and rejected) now.
2. ``dataset``: the reviewed samples as a YOLO dataset (the production model's classes first,
   classes reviewers added after them: a new defect class gets the next id), plus a replay buffer
   of ``replay_images`` earlier images (the dataset the production model was trained on), so that
   old classes are not forgotten. An image whose bytes are a golden-set image's is left out
   (counted in ``dataset.json``, logged): the gate scores only frames the candidate never saw.
3. ``train``: Ultralytics, starting from the production checkpoint; a new class widens the class
   head first (:func:`models.class_head.widen_class_head`: the old classes' weights kept).
   ``retrain`` trains every layer; ``retrain-cpu`` trains layers 5+ on crops (:mod:`models.crops`); ``auto``
   (the default) picks ``retrain`` on a GPU hub, ``retrain-cpu`` without one.
4. ``release``: ONNX FP32 + INT8 bundle, operating threshold chosen on validation
   (:func:`models.release.release_bundle`), version = production's minor + 1.
5. ``split``: when production has split parts and the fleet runs them (``split_parts``: ``auto``
   leaves them out when every agent heard from in 30 days reported full mode in its heartbeats;
   decided at the snapshot), the candidate gets its own: production's bottleneck,
   as it is when layers 0..cut are production's (tensor for tensor), else fine-tuned to the new
   layers (``split_retune_steps``; on a GPU hub in a process started beside the release step);
   the hub part rebuilt from the new layers (INT8, calibrated on the training data). Skipped for
   an unsplit production.
6. ``gate``: candidate and production scored on the golden set and on the new reviewed data, a
   split candidate's parts on the golden set (:mod:`hub.retrain_gate`, :mod:`hub.gate`,
   :mod:`hub.gate_scoring`); the report lands in the job directory and in the bundle directory.
7. ``sign``: Ed25519 over the manifest (only a candidate that passed the gate is ever signed).
8. ``register``: in the model registry as ``candidate`` (passed) or ``rejected`` (failed), with the
   training data snapshot and the gate's figures.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from hub.blobs import BlobStore
from hub.fleet import fleet_runs_split
from hub.retrain_data import copy_split, dataset_names, image_hashes, replay_limits
from hub.retrain_gate import JobGate
from hub.retrain_state import (
    JobState,
    RetrainBusy,
    RetrainError,
    RetrainSettings,
    job_lock,
    next_version,
    now,
    split_parts_decision,
)
from hub.tables import Sample
from models.fsutil import atomic_write_json

__all__ = ["STEPS", "JobState", "RetrainBusy", "RetrainError", "RetrainJob", "RetrainSettings", "job_lock",
           "next_version"]

log = logging.getLogger(__name__)

REPLAY_PREFIX = "replay_"  #: names of the replay buffer's frames in the job's dataset (the rest are reviewed)
REVIEWED_COPY_PREFIX = "copy"  #: reviewed frames placed again (retrain.reviewed_repeats): copy1_, copy2_, ...

STEPS = ("snapshot", "dataset", "train", "release", "split", "gate", "sign", "register")


class RetrainJob:
    """``RetrainJob.create(root, ...)`` then ``run()``; ``RetrainJob(root / job_id, ...)`` resumes one."""

    def __init__(self, work: Path, settings: RetrainSettings, sessions: sessionmaker[Session], blobs: BlobStore,
                 on_step: Callable[[JobState], None] | None = None) -> None:
        self.work, self.settings, self.sessions, self.blobs = Path(work), settings, sessions, blobs
        self.on_step = on_step
        self.state = JobState.read(self.work / "state.json")
        self._prep: Any = None  # models.split_rebuild.BottleneckPrep, from the train step to the release step
        self._gate: JobGate | None = None  # scoring workers, gate inputs: from the release step to the run's end

    @classmethod
    def create(cls, root: Path, settings: RetrainSettings, sessions: sessionmaker[Session], blobs: BlobStore, *,
               trigger: str = "manual", requested_by: str = "cli", **kw: Any) -> RetrainJob:
        job_id = datetime.now(UTC).strftime("%Y%m%dT%H%M%S") + f"-{os.getpid()}-{random.randrange(16**4):04x}"
        work = Path(root) / job_id
        work.mkdir(parents=True)
        atomic_write_json(work / "state.json", asdict(JobState(job_id, trigger, requested_by, created_at=now())))
        return cls(work, settings, sessions, blobs, **kw)

    @staticmethod
    def unfinished(root: Path) -> list[Path]:
        """Job directories whose state is queued or running (a crash leaves ``running``), oldest first."""
        out = []
        for st in sorted(Path(root).glob("*/state.json")):
            if JobState.read(st).status in ("queued", "running"):
                out.append(st.parent)
        return out

    def _save(self) -> None:
        atomic_write_json(self.work / "state.json", asdict(self.state))
        if self.on_step:
            self.on_step(self.state)

    def run(self) -> JobState:
        with job_lock(self.work.parent / ".lock"):
            st = self.state
            if st.status in ("succeeded", "rejected", "failed"):
                return st
            st.status, st.started_at, st.error = "running", st.started_at or now(), None
            self._save()
            try:
                for step in STEPS:
                    if step in st.steps_done:
                        continue
                    st.step = step
                    self._save()
                    t0 = time.perf_counter()
                    log.info("retrain %s: %s", st.job_id, step)
                    getattr(self, f"_step_{step}")()
                    st.seconds[step] = round(time.perf_counter() - t0, 1)
                    st.steps_done.append(step)
                    self._save()
                st.status = "succeeded" if st.gate_passed else "rejected"
            except Exception as e:
                st.status, st.error = "failed", f"{st.step}: {type(e).__name__}: {e}"
                log.exception("retrain %s failed at %s", st.job_id, st.step)
            finally:
                if self._prep is not None:  # a step failed between starting it and the release
                    self._prep.cancel()
                    self._prep = None
                if self._gate is not None:
                    self._gate.close()
                    self._gate = None
            st.finished_at = now()
            self._save()
            return st

    # -- steps ---------------------------------------------------------------------------------

    def _snapshot(self) -> dict[str, Any]:
        return json.loads((self.work / "snapshot.json").read_text())

    def _step_snapshot(self) -> None:
        from hub.registry import production

        with self.sessions() as s:
            prod = production(s)
            if prod is None:
                raise RetrainError("no production model in the registry: register the first one with "
                                   "'lineguard-hub models register --production'")
            rows = s.execute(select(Sample.id, Sample.sample_id)
                             .where(Sample.status.in_(("confirmed", "rejected"))).order_by(Sample.id)).all()
            fleet_split = fleet_runs_split(s)
        if len(rows) < self.settings.min_reviewed:
            raise RetrainError(f"{len(rows)} reviewed samples; retraining needs at least {self.settings.min_reviewed}")
        from models.bundle import load_bundle

        bundle = load_bundle(Path(prod.bundle_path), roles=("checkpoint",))
        split_parts, why = split_parts_decision(self.settings.split_parts, fleet_split)
        if bundle.manifest.split:
            log.info("retrain %s: split parts %s: %s", self.state.job_id, "built" if split_parts else "left out", why)
        self.state.production_version = prod.version
        atomic_write_json(self.work / "snapshot.json", {
            "production_version": prod.version, "production_bundle": prod.bundle_path,
            "classes": list(bundle.manifest.classes), "input_size": list(bundle.manifest.input_size),
            "sample_pks": [r[0] for r in rows], "sample_ids": [r[1] for r in rows],
            "split_parts": split_parts, "split_parts_reason": why})

    def _step_dataset(self) -> None:
        from hub.export import export_dir
        from models.crops import crop_split
        from models.train import PRESETS

        snap = self._snapshot()
        reviewed = self.work / "reviewed"
        shutil.rmtree(reviewed, ignore_errors=True)  # a half-written export from a crash
        with self.sessions() as s:
            export_dir(s, self.blobs, reviewed, classes=snap["classes"], val_share=self.settings.val_share)
        names = list(yaml.safe_load((reviewed / "data.yaml").read_text())["names"].values())
        out = self.work / "train_data"
        tmp = self.work / "train_data.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        counts: dict[str, dict[str, int]] = {"reviewed": {}, "replay": {}, "golden_left_out": {}}
        golden = image_hashes(Path(self.settings.golden))  # never trained on, nor validated on
        for split in ("train", "val"):
            counts["reviewed"][split], left = copy_split(reviewed, split, tmp, names, names, exclude=golden)
            counts["golden_left_out"][f"reviewed_{split}"] = left
        for k in range(1, self.settings.reviewed_repeats):  # the reviewed frames weigh more than the replay buffer
            copy_split(reviewed, "train", tmp, names, names, prefix=f"{REVIEWED_COPY_PREFIX}{k}_", exclude=golden)
        counts["reviewed_repeats"] = {"train": self.settings.reviewed_repeats}
        if self.settings.replay_data is not None:
            replay = Path(self.settings.replay_data)
            rnames = dataset_names(replay)
            unknown = [n for n in rnames if n not in names]
            if unknown:
                raise RetrainError(f"replay data {replay} has classes {unknown} the model does not know")
            limits = replay_limits(self.settings.replay_images, self.settings.replay_val_images)
            for split, limit in limits.items():
                counts["replay"][split], left = copy_split(
                    replay, split, tmp, rnames, names, prefix=REPLAY_PREFIX, limit=limit, exclude=golden)
                counts["golden_left_out"][f"replay_{split}"] = left
        if any(counts["golden_left_out"].values()):
            log.warning("retrain %s: %s images are golden-set images (%s): left out of training and validation, "
                        "so the gate scores only frames the candidate never saw", self.state.job_id,
                        sum(counts["golden_left_out"].values()), counts["golden_left_out"])
        crop, train_split = PRESETS[self._preset_name()].crop, "train"
        if crop is not None:  # the CPU preset trains on crops of the frames at the model's scale
            train_split = "train_crops"
            crop = replace(crop, input_hw=(int(snap["input_size"][0]), int(snap["input_size"][1])))
            frames, crops = crop_split(tmp, "train", train_split, len(names), crop,
                                       is_new=lambda path: not path.name.startswith(REPLAY_PREFIX))
            counts["crops"] = {"frames": frames, "crops": crops}
        (tmp / "data.yaml").write_text(yaml.safe_dump({"path": str(out), "train": f"images/{train_split}",
                                                       "val": "images/val",
                                                       "names": dict(enumerate(names))}, sort_keys=False))
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
        atomic_write_json(self.work / "dataset.json", {"names": names, "counts": counts})
        if not counts["reviewed"]["train"] and not counts["replay"].get("train"):
            raise RetrainError("no training images")
        if not counts["reviewed"]["val"] and not counts["replay"].get("val"):
            replay_said = "no replay data" if self.settings.replay_data is None else counts["replay"]
            raise RetrainError(
                f"no validation images: no reviewed sample is on the validation side (val_share "
                f"{self.settings.val_share}; golden-set images left out: {counts['golden_left_out']}) and the "
                f"replay data gave none ({replay_said}); review more samples, or give replay data with a val split")

    def _step_train(self) -> None:
        from models.bundle import load_bundle
        from models.train import PRESETS, train

        snap = self._snapshot()
        runs = self.work / "runs"
        preset = PRESETS[self._preset_name()]
        # the split bottleneck's process loads and warms up while training runs; it gets the checkpoint after
        self._prep = self._start_bottleneck_prep(snap, None)
        last = runs / preset.name / "weights" / "last.pt"
        if last.exists():
            log.info("retrain %s: resuming training from %s", self.state.job_id, last)
            result = train(self.work / "train_data" / "data.yaml", preset=preset, project_dir=runs, resume=True)
        else:
            ckpt = load_bundle(Path(snap["production_bundle"]), roles=("checkpoint",)).path("checkpoint")
            names = json.loads((self.work / "dataset.json").read_text())["names"]
            if names != snap["classes"]:  # reviewers added classes: widen the head, keep the old rows
                from models.class_head import widen_class_head

                ckpt = widen_class_head(ckpt, names, self.work / "start.pt")
                log.info("retrain %s: class head widened %s -> %s", self.state.job_id, snap["classes"], names)
            result = train(self.work / "train_data" / "data.yaml", preset=preset, project_dir=runs,
                           weights=ckpt, epochs=self.settings.epochs, hours=self.settings.hours,
                           device=self.settings.device, workers=self.loader_workers())
        atomic_write_json(self.work / "train.json", {"checkpoint": str(result.checkpoint), "metrics": result.metrics})
        if self._prep is not None:
            self._prep.submit(result.checkpoint)

    def _step_release(self) -> None:
        from hub.registry import list_versions
        from models.release import release_bundle

        snap = self._snapshot()
        with self.sessions() as s:
            version = next_version([m.version for m in list_versions(s)])
        ckpt = Path(json.loads((self.work / "train.json").read_text())["checkpoint"])
        out = Path(self.settings.bundles_dir) / version
        prep, self._prep = self._prep or self._start_bottleneck_prep(snap, ckpt), None  # resumed here: start it now
        try:
            release_bundle(ckpt, self.work / "train_data", out, version=version,
                           parent_version=snap["production_version"],
                           imgsz=(int(snap["input_size"][0]), int(snap["input_size"][1])), overwrite=True,
                           progress=False, workers=self.settings.score_workers,
                           calib_images=self.settings.calib_images, pool=self._job_gate().pool())
            if prep is not None:  # fill the wait for the GPU fine-tuning with the gate's whole-model passes
                self._job_gate().prefetch(out)
        finally:
            if prep is not None:
                prep.join()
                if prep.exitcode:
                    log.warning("retrain %s: the split bottleneck's preparation exited %s: the split step will "
                                "redo it", self.state.job_id, prep.exitcode)
        self.state.candidate_version = version

    def _job_gate(self) -> JobGate:
        if self._gate is None:
            self._gate = JobGate(self.work, self.settings, Path(self._snapshot()["production_bundle"]),
                                 self.state.job_id)
        return self._gate

    def _start_bottleneck_prep(self, snap: dict[str, Any], ckpt: Path | None) -> Any:
        """On a GPU hub, the split step's bottleneck work (a GPU fine-tuning when training changed the
        device part's layers) runs in a process started with training (``ckpt`` None: it loads and
        warms up, then waits for the checkpoint) or at the release (resumed there), beside the
        release's CPU work; None on a CPU hub or when production has no split parts."""
        if not self._on_gpu() or not snap.get("split_parts", True):
            return None
        from models.split_rebuild import start_prepare_bottleneck

        return start_prepare_bottleneck(Path(snap["production_bundle"]), ckpt, calib_data=self.work / "train_data",
                                        work=self.work / "split", retune_steps=self.settings.split_retune_steps,
                                        device=self.settings.device)

    def loader_workers(self) -> int:
        """The configured data loader workers; by default one per core up to 8 on a GPU hub (mosaic
        loading at 960 px for batch 16 on an H100: 8 workers as fast as 16 per epoch, and quicker to
        start; 2 would starve the GPU), 2 on a CPU hub (where the loader's cores are the training's)."""
        if self.settings.workers is not None:
            return self.settings.workers
        return min(8, os.cpu_count() or 1) if self._on_gpu() else 2

    def _preset_name(self) -> str:
        """The configured preset; ``auto``: ``retrain`` (every layer) on a GPU hub, else ``retrain-cpu``
        (crops, layers 0-4 frozen: every layer plus the bottleneck fine-tuning would take hours on a CPU)."""
        name = self.settings.preset
        if name == "auto":
            name = "retrain" if self._on_gpu() else "retrain-cpu"
            log.info("retrain %s: preset auto -> %s", self.state.job_id, name)
        return name

    def _on_gpu(self) -> bool:
        dev = (self.settings.device or "").strip()
        if dev == "cpu":
            return False
        import torch

        return bool(torch.cuda.is_available())

    def _step_split(self) -> None:
        from models.bundle import load_bundle

        snap = self._snapshot()
        prod = load_bundle(Path(snap["production_bundle"]), roles=())
        if not prod.manifest.split:
            log.info("retrain %s: production %s is not split: no split parts to rebuild", self.state.job_id,
                     prod.manifest.version)
            return
        if not snap.get("split_parts", True):  # (a snapshot from before the setting has none: built, as then)
            log.info("retrain %s: no split parts for the candidate (%s)", self.state.job_id, snap["split_parts_reason"])
            return
        from models.split_rebuild import production_bottleneck, rebuild_split_parts

        if production_bottleneck(prod) is None:
            log.warning("retrain %s: production %s is split but its bottleneck is not on this hub (%s): the "
                        "candidate gets no split parts", self.state.job_id, prod.manifest.version,
                        Path(snap["production_bundle"]))
            return
        assert self.state.candidate_version
        cand = Path(self.settings.bundles_dir) / self.state.candidate_version
        ckpt = Path(json.loads((self.work / "train.json").read_text())["checkpoint"])
        rebuild_split_parts(Path(snap["production_bundle"]), cand, calib_data=self.work / "train_data",
                            work=self.work / "split", retune_steps=self.settings.split_retune_steps,
                            device=self.settings.device, checkpoint=ckpt)

    def _step_gate(self) -> None:
        assert self.state.candidate_version
        result = self._job_gate().run(Path(self.settings.bundles_dir) / self.state.candidate_version)
        self.state.gate_passed, self.state.gate_reasons = result.passed, result.reasons

    def _step_sign(self) -> None:
        if not self.state.gate_passed:
            log.info("retrain %s: gate failed: %s is not signed", self.state.job_id, self.state.candidate_version)
            return
        from models.signing import load_private_key, sign_bundle

        key = self.settings.signing_key
        if key is None:
            raise RetrainError("no signing key: set retrain.signing_key_file (or LINEGUARD_SIGNING_KEY_FILE)")
        assert self.state.candidate_version
        sign_bundle(Path(self.settings.bundles_dir) / self.state.candidate_version, load_private_key(key))

    def _step_register(self) -> None:
        from hub.registry import RegistryError, get, register, set_status

        snap = self._snapshot()
        v = self.state.candidate_version
        assert v
        gate = json.loads((self.work / "gate" / "gate.json").read_text())
        metrics = {"gate": {"passed": gate["passed"], "reasons": gate["reasons"], "checks": gate["checks"],
                            "golden_fingerprint": gate["golden_fingerprint"]},
                   "job": self.state.job_id}
        with self.sessions.begin() as s:
            try:
                info = get(s, v)  # registered before a crash
            except RegistryError:
                info = register(s, Path(self.settings.bundles_dir) / v, actor="retrain",
                                data_snapshot=snap["sample_pks"], metrics=metrics)
            if not self.state.gate_passed and info.status == "candidate":
                set_status(s, v, "rejected", actor="gate", reason="; ".join(self.state.gate_reasons))
