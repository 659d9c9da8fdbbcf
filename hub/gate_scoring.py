"""Scoring for the gate step of a retraining job (:mod:`hub.retrain`): the candidate and production
on a dataset's val split, and a split candidate's two parts on the golden set.

Scoring passes run over worker processes, all of a gate's passes over one pool
(:func:`models.parallel_predict.predict_many`, :meth:`GateScorer.score_all`). On the
golden set both models' detections go through :class:`~models.parallel_predict.DetectionCache`:
production's are the same every week, and a candidate that is promoted is next week's production,
so from the second job on a hub the production pass is read back instead of predicted.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, NamedTuple

from hub.gate import Scored, score_model_detections
from models.bundle import Bundle
from models.dataset_io import YoloDataset
from models.detections import Detections

__all__ = ["GateScorer", "GateScores", "SPLIT_ROLES", "operating_conf"]

log = logging.getLogger(__name__)

#: the parts a split agent and the hub run; a candidate with both is scored as a split model too
SPLIT_ROLES = ("split_edge_int8", "split_hub")
_CONF, _NMS_IOU = 0.001, 0.7  # prediction settings of every scoring pass (as mAP is usually computed)


class GateScores(NamedTuple):
    """What :meth:`GateScorer.score_all` returns: (candidate, production) on the golden set, the
    candidate's split parts there (None without parts), (candidate, production) on the reviewed data."""

    golden: tuple[Scored, Scored]
    split: Scored | None
    new: tuple[Scored, Scored] | None


def operating_conf(b: Bundle) -> float:
    """The threshold the line alarms at: the manifest's ``operating_conf`` (its ``conf`` when that is 0)."""
    pp = b.manifest.postprocessing
    return float(pp.get("operating_conf") or pp.conf)


class GateScorer:
    """``pair(dataset, key, candidate, production)`` and ``split(dataset, candidate)``; bundles
    loaded with their ``onnx_int8`` (and, for ``split``, :data:`SPLIT_ROLES`) verified."""

    def __init__(self, cache_dir: Path, *, workers: int | None = None, iou: float = 0.5, pool: Any = None) -> None:
        """``pool``: a :class:`models.parallel_predict.ScoringPool` to predict with (else one per call)."""
        from models.parallel_predict import DetectionCache

        self.cache, self.workers, self.iou, self.pool = DetectionCache(cache_dir), workers, iou, pool
        self._prefetched: dict[tuple[Any, ...], tuple[list[str], Any]] = {}  # key -> (tags, PendingPredictions)

    def _predict(self, jobs: list[tuple[Any, YoloDataset]]) -> list[list[Detections]]:
        from models.parallel_predict import predict_many

        return predict_many([(model, ds.split("val")) for model, ds in jobs], conf=_CONF, iou=_NMS_IOU,
                            workers=self.workers, pool=self.pool)

    def _score(self, dataset: YoloDataset, b: Bundle, dets: list[Detections]) -> Scored:
        return score_model_detections(dataset, "val", dets, list(b.manifest.classes), operating_conf(b), iou=self.iou)

    def score_all(self, golden: YoloDataset, golden_key: str, cand: Bundle, prod: Bundle,
                  reviewed: YoloDataset | None = None) -> GateScores:
        """Every pass the gate needs over **one** pool of workers: both models on the golden set
        (each read from the detection cache when it is there, else predicted and cached), the
        candidate's split parts on the golden set, and both models on the reviewed data. Passes
        :meth:`prefetch` queued for the same models and data are taken up, not run again."""
        got: dict[str, list[Detections]] = {}
        whole = self._whole_model_jobs(golden, golden_key, cand, prod, reviewed, got)
        pending = self._prefetched.pop(self._prefetch_key(golden_key, cand, prod, reviewed), None)
        jobs: list[tuple[str, Any, YoloDataset]] = []
        if pending is not None and pending[0] == [tag for tag, _, _ in whole]:
            log.info("gate: %d whole-model passes were queued early (%s)", len(whole), ", ".join(pending[0]))
            for (tag, model, _), dets in zip(whole, pending[1].result(), strict=True):
                self._keep(got, tag, model, golden_key, dets)
        else:
            jobs += whole
        for tags, _ in self._prefetched.values():  # queued for other bytes or data: their results are not used
            log.warning("gate: passes queued early (%s) were for other models or data; running them here",
                        ", ".join(tags))
        self._prefetched.clear()
        cand_split = self._split_bundle(cand)
        if cand_split is not None:
            jobs.append(("golden split", self._split_model(cand_split), golden))
        preds = self._predict([(m, ds) for _, m, ds in jobs]) if jobs else []
        for (tag, model, _), dets in zip(jobs, preds, strict=True):
            self._keep(got, tag, model, golden_key, dets)
        golden_pair = (self._score(golden, cand, got["golden candidate"]),
                       self._score(golden, prod, got["golden production"]))
        split = self._score(golden, cand, got["golden split"]) if cand_split is not None else None
        new = ((self._score(reviewed, cand, got["new candidate"]), self._score(reviewed, prod, got["new production"]))
               if reviewed is not None else None)
        return GateScores(golden_pair, split, new)

    def prefetch(self, golden: YoloDataset, golden_key: str, cand: Bundle, prod: Bundle,
                 reviewed: YoloDataset | None = None) -> int:
        """Queue :meth:`score_all`'s passes that need only the two whole INT8 models (the golden
        set unless cached, the reviewed data) on the pool now, so they run while the job does other
        work (a split candidate's parts are rebuilt after the release); :meth:`score_all` with
        the same models and data collects them. Returns the passes queued (none without a pool)."""
        from models.parallel_predict import predict_many_later

        if self.pool is None:
            return 0
        whole = self._whole_model_jobs(golden, golden_key, cand, prod, reviewed, {}, quiet=True)
        if whole:
            pending = predict_many_later([(m, ds.split("val")) for _, m, ds in whole], pool=self.pool,
                                         conf=_CONF, iou=_NMS_IOU)
            self._prefetched[self._prefetch_key(golden_key, cand, prod, reviewed)] = (
                [tag for tag, _, _ in whole], pending)
        return len(whole)

    def _whole_model_jobs(self, golden: YoloDataset, golden_key: str, cand: Bundle, prod: Bundle,
                          reviewed: YoloDataset | None, got: dict[str, list[Detections]],
                          quiet: bool = False) -> list[tuple[str, Path, YoloDataset]]:
        """The whole models' passes still to run, tagged; golden-set detections in the cache go to ``got``."""
        jobs: list[tuple[str, Path, YoloDataset]] = []
        for b, who in ((cand, "candidate"), (prod, "production")):
            hit = self.cache.lookup(b.path("onnx_int8"), golden_key, "val", _CONF, _NMS_IOU)
            if not quiet:
                log.info("gate: %s %s on the golden set %s", who, b.manifest.version,
                         "from the detection cache" if hit is not None else "to predict (then cached)")
            if hit is None:
                jobs.append((f"golden {who}", b.path("onnx_int8"), golden))
            else:
                got[f"golden {who}"] = hit
        if reviewed is not None:
            jobs += [("new candidate", cand.path("onnx_int8"), reviewed),
                     ("new production", prod.path("onnx_int8"), reviewed)]
        return jobs

    @staticmethod
    def _prefetch_key(golden_key: str, cand: Bundle, prod: Bundle, reviewed: YoloDataset | None) -> tuple[Any, ...]:
        return (golden_key, cand.manifest.files["onnx_int8"].sha256, prod.manifest.files["onnx_int8"].sha256,
                None if reviewed is None else str(reviewed.root))

    def _keep(self, got: dict[str, list[Detections]], tag: str, model: Any, golden_key: str,
              dets: list[Detections]) -> None:
        got[tag] = dets
        if tag in ("golden candidate", "golden production"):
            self.cache.put(model, golden_key, "val", _CONF, _NMS_IOU, dets)

    def pair(self, dataset: YoloDataset, dataset_key: str | None, cand: Bundle, prod: Bundle) -> tuple[Scored, Scored]:
        """Candidate and production on ``dataset``'s val split, each at its own operating threshold.
        With a ``dataset_key`` (the golden set's fingerprint) detections are cached by model file."""
        out = []
        for b, who in ((cand, "candidate"), (prod, "production")):
            model = b.path("onnx_int8")
            if dataset_key is None:
                dets = self._predict([(model, dataset)])[0]
            else:
                def predict(model: Path = model) -> list[Detections]:
                    return self._predict([(model, dataset)])[0]

                dets, hit = self.cache.get(model, dataset_key, "val", _CONF, _NMS_IOU, predict)
                log.info("gate: %s %s on the golden set %s", who, b.manifest.version,
                         "from the detection cache" if hit else "predicted (now cached)")
            out.append(self._score(dataset, b, dets))
        return out[0], out[1]

    def split(self, dataset: YoloDataset, cand: Bundle) -> Scored | None:
        """The candidate's split parts (edge INT8 -> wire codes -> hub INT8) on ``dataset``'s val
        split at the candidate's operating threshold; None for a candidate without split parts."""
        b = self._split_bundle(cand)
        if b is None:
            return None
        return self._score(dataset, b, self._predict([(self._split_model(b), dataset)])[0])

    @staticmethod
    def _split_bundle(cand: Bundle) -> Bundle | None:
        """The candidate with its split parts' hashes checked (as the agents will); None without parts."""
        m = cand.manifest
        if not m.split or not all(r in m.files for r in SPLIT_ROLES):
            return None
        from models.bundle import load_bundle

        return load_bundle(cand.dir, roles=SPLIT_ROLES)

    @staticmethod
    def _split_model(b: Bundle) -> Any:
        from models.parallel_predict import SplitModel

        imgsz = (int(b.manifest.input_size[0]), int(b.manifest.input_size[1]))
        return SplitModel(b.path(SPLIT_ROLES[0]), b.path(SPLIT_ROLES[1]), imgsz)
