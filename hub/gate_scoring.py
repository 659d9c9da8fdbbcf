"""Scoring for the gate step of a retraining job (:mod:`hub.retrain`): the candidate and production
on a dataset's val split, and a split candidate's two parts on the golden set.

Scoring passes run over worker processes (:func:`models.parallel_predict.predict_samples`). On the
golden set both models' detections go through :class:`~models.parallel_predict.DetectionCache`:
production's are the same every week, and a candidate that is promoted is next week's production,
so from the second job on a hub the production pass is read back instead of predicted.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hub.gate import Scored, map_classes, score_detections
from models.bundle import Bundle
from models.dataset_io import YoloDataset
from models.detections import Detections

__all__ = ["GateScorer", "SPLIT_ROLES", "operating_conf"]

log = logging.getLogger(__name__)

#: the parts a split agent and the hub run; a candidate with both is scored as a split model too
SPLIT_ROLES = ("split_edge_int8", "split_hub")


def operating_conf(b: Bundle) -> float:
    """The threshold the line alarms at: the manifest's ``operating_conf`` (its ``conf`` when that is 0)."""
    pp = b.manifest.postprocessing
    return float(pp.get("operating_conf") or pp.conf)


class GateScorer:
    """``pair(dataset, key, candidate, production)`` and ``split(dataset, candidate)``; bundles
    loaded with their ``onnx_int8`` (and, for ``split``, :data:`SPLIT_ROLES`) verified."""

    def __init__(self, cache_dir: Path, *, workers: int | None = None, iou: float = 0.5) -> None:
        from models.parallel_predict import DetectionCache

        self.cache, self.workers, self.iou = DetectionCache(cache_dir), workers, iou

    def _predict(self, model: Any, dataset: YoloDataset) -> list[Detections]:
        from models.parallel_predict import predict_samples

        return predict_samples(model, dataset.split("val"), conf=0.001, iou=0.7, workers=self.workers)

    def pair(self, dataset: YoloDataset, dataset_key: str | None, cand: Bundle, prod: Bundle) -> tuple[Scored, Scored]:
        """Candidate and production on ``dataset``'s val split, each at its own operating threshold.
        With a ``dataset_key`` (the golden set's fingerprint) detections are cached by model file."""
        out = []
        for b, who in ((cand, "candidate"), (prod, "production")):
            model = b.path("onnx_int8")
            if dataset_key is None:
                dets = self._predict(model, dataset)
            else:
                def predict(model: Path = model) -> list[Detections]:
                    return self._predict(model, dataset)

                dets, hit = self.cache.get(model, dataset_key, "val", 0.001, 0.7, predict)
                log.info("gate: %s %s on the golden set %s", who, b.manifest.version,
                         "from the detection cache" if hit else "predicted (now cached)")
            dets = map_classes(dets, list(b.manifest.classes), list(dataset.names))
            out.append(score_detections(dataset, "val", dets, operating_conf(b), iou=self.iou))
        return out[0], out[1]

    def split(self, dataset: YoloDataset, cand: Bundle) -> Scored | None:
        """The candidate's split parts (edge INT8 -> wire codes -> hub INT8) on ``dataset``'s val
        split at the candidate's operating threshold; None for a candidate without split parts."""
        m = cand.manifest
        if not m.split or not all(r in m.files for r in SPLIT_ROLES):
            return None
        from models.bundle import load_bundle
        from models.parallel_predict import SplitModel

        cand = load_bundle(cand.dir, roles=SPLIT_ROLES)  # the parts' hashes checked as the agents will
        imgsz = (int(m.input_size[0]), int(m.input_size[1]))
        dets = self._predict(SplitModel(cand.path(SPLIT_ROLES[0]), cand.path(SPLIT_ROLES[1]), imgsz), dataset)
        dets = map_classes(dets, list(m.classes), list(dataset.names))
        return score_detections(dataset, "val", dets, operating_conf(cand), iou=self.iou)
