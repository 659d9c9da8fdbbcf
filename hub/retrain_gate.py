"""The gate step of a retraining job (:mod:`hub.retrain`): its scoring workers, inputs and report.

A job's :class:`JobGate` lives from the release step to the end of the run. Its scoring pool is
spawned once (the first time, while the release exports) and serves the release's validation
passes and the gate's; the gate's inputs (golden set and its fingerprint, production, the reviewed
validation data) are loaded once, for the passes queued early (:meth:`JobGate.prefetch`) and for
the gate (:meth:`JobGate.run`) alike.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from hub.gate import GateResult, decide, fingerprint, write_report
from hub.retrain_state import RetrainSettings
from models.fsutil import link_or_copy

__all__ = ["JobGate"]

log = logging.getLogger(__name__)


class JobGate:
    """``work``: the job's directory; ``production``: the production bundle the job started from."""

    def __init__(self, work: Path, settings: RetrainSettings, production: Path, job_id: str) -> None:
        self.work, self.settings, self.production, self.job_id = Path(work), settings, Path(production), job_id
        self._pool: Any = None  # models.parallel_predict.ScoringPool
        self._scorer: Any = None  # hub.gate_scoring.GateScorer on that pool
        self._inputs: tuple[Any, str, Any, Any] | None = None  # (golden, its fingerprint, production, reviewed)

    def pool(self) -> Any:
        """The job's scoring workers, spawned on first use; None where one process scores (fewer than 4 cores)."""
        from models.parallel_predict import ScoringPool, default_workers

        workers = self.settings.score_workers or default_workers()
        if self._pool is None and workers > 1:
            self._pool = ScoringPool(workers)
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
        self._pool, self._scorer = None, None

    def _gate_scorer(self) -> Any:
        from hub.gate_scoring import GateScorer

        if self._scorer is None:
            self._scorer = GateScorer(Path(self.settings.bundles_dir) / ".detections",
                                      workers=self.settings.score_workers, iou=self.settings.rule.iou,
                                      pool=self.pool())
        return self._scorer

    def _load(self, cand_dir: Path) -> tuple[Any, str, Any, Any, Any]:
        """(golden set, its fingerprint, candidate, production, reviewed val data or None), bundles verified."""
        from models.bundle import load_bundle
        from models.dataset_io import load_dataset

        if self._inputs is None:
            golden = load_dataset(Path(self.settings.golden), splits=["val"])
            prod = load_bundle(self.production, roles=("onnx_int8",))
            val_dir = self.work / "reviewed" / "images" / "val"
            reviewed = (load_dataset(self.work / "reviewed", splits=["val"])
                        if val_dir.is_dir() and any(val_dir.iterdir()) else None)
            self._inputs = (golden, fingerprint(self.settings.golden), prod, reviewed)
        golden, golden_fp, prod, reviewed = self._inputs
        return golden, golden_fp, load_bundle(cand_dir, roles=("onnx_int8",)), prod, reviewed

    def prefetch(self, released: Path) -> None:
        """Queue the gate's whole-model passes now, reading the candidate from a linked copy of the
        release in the job's directory: the split step rewrites the bundle directory meanwhile."""
        snap = self.work / "prefetch"
        shutil.rmtree(snap, ignore_errors=True)
        shutil.copytree(released, snap, copy_function=link_or_copy)
        n = self._gate_scorer().prefetch(*self._load(snap))
        log.info("retrain %s: %d gate passes queued beside the split parts' rebuild", self.job_id, n)

    def run(self, cand_dir: Path) -> GateResult:
        """Score and decide; the report lands in the job's ``gate/`` and beside the candidate's bundle."""
        golden, golden_fp, cand, prod, reviewed = self._load(cand_dir)
        g, g_split, new = self._gate_scorer().score_all(golden, golden_fp, cand, prod, reviewed)
        new_c, new_p = new if new is not None else (None, None)
        result = decide(self.settings.rule, g[0], g[1], new_c, new_p, golden_split=g_split)
        if new is None:  # nothing shows that the candidate learned what was reviewed: it does not ship
            result.passed = False
            result.reasons.append(f"new data: no reviewed sample fell on the validation side "
                                  f"(val_share {self.settings.val_share}); review more samples")
        report = write_report(self.work / "gate", result, candidate=cand.manifest.version,
                              production=prod.manifest.version, golden_fingerprint=golden_fp,
                              golden=g, new=new, rule=self.settings.rule, golden_split=g_split)
        shutil.copytree(self.work / "gate", cand_dir.parent / f"{cand_dir.name}.gate", dirs_exist_ok=True)
        shutil.rmtree(self.work / "prefetch", ignore_errors=True)
        log.info("retrain %s: gate %s for %s (%s)", self.job_id, "passed" if result.passed else "FAILED",
                 cand.manifest.version, report)
        return result
