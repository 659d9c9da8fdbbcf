"""From a trained checkpoint to a shippable bundle, measured.

1. Export ONNX FP32 and quantize INT8 (:func:`models.export.build_bundle`) into a staging dir.
2. Run both models over the dataset's validation split.
3. Choose the operating confidence threshold on validation, with the INT8 model (the one the
   agents run): the lowest threshold whose good-part false-alarm rate stays under
   ``target_far`` (default 0.2%, under the 0.3% the line is held to, as margin for the test split).
4. Write the final bundle with that threshold and the validation metrics of both models in its
   manifest. The test split is never looked at here: it is for ``lineguard-model eval`` and
   ``bench/accuracy.py``.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from models.bundle import Manifest, load_bundle, write_bundle
from models.dataset_io import load_dataset
from models.evaluate import evaluate_predictions
from models.metrics import choose_operating_threshold
from models.parallel_predict import ScoringPool, predict_many
from models.quantize import DEFAULT_CALIBRATION_IMAGES

__all__ = ["release_bundle"]

log = logging.getLogger(__name__)

ROLES = ("onnx_fp32", "onnx_int8")


def release_bundle(
    checkpoint: Path,
    dataset_dir: Path,
    out_dir: Path,
    version: str,
    parent_version: str | None = None,
    target_far: float = 0.002,
    imgsz: tuple[int, int] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    workers: int | None = None,
    calib_images: int = DEFAULT_CALIBRATION_IMAGES,
    pool: ScoringPool | None = None,
) -> Manifest:
    """``pool``: the workers to score the validation split with (default: a pool of ``workers``
    for this call)."""
    from models.export import build_bundle  # torch / ultralytics: the train extra

    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists (pass overwrite=True to replace it)")
    stage = out_dir.parent / f".{out_dir.name}.stage"
    shutil.rmtree(stage, ignore_errors=True)
    try:
        staged = build_bundle(checkpoint, stage, calib_dir=dataset_dir, version=version,
                              parent_version=parent_version, imgsz=imgsz,
                              calib_images=calib_images)
        bundle = load_bundle(stage, roles=(*ROLES, "checkpoint"))
        dataset = load_dataset(Path(dataset_dir))
        val = dataset.split("val")
        # both models over one pool of workers; multi-label as mAP is usually computed
        passes = predict_many([(bundle.path(role), val) for role in ROLES], multi_label=True, workers=workers,
                              pool=pool, progress=progress)
        dets = dict(zip(ROLES, passes, strict=True))
        parts = [s.parts for s in val]
        operating = choose_operating_threshold(parts, dets["onnx_int8"], target_far=target_far)
        metrics: dict[str, Any] = {"split": "val", "n_images": len(val), "target_far": target_far}
        for role in ROLES:
            report = evaluate_predictions(dataset, "val", dets[role], operating_conf=operating)
            metrics[role] = {k: v for k, v in report.to_dict().items() if k != "split"}
            pl = report.part_level
            log.info("%s on val: mAP50 %.4f, part recall %.4f, false alarms %.4f at conf %.3f",
                     role, report.map50, pl["recall"], pl["false_alarm_rate"], operating)
        metrics["int8_map50_delta"] = metrics["onnx_int8"]["map50"] - metrics["onnx_fp32"]["map50"]
        post = staged.postprocessing.model_dump()
        post["operating_conf"] = round(float(operating), 6)
        manifest = write_bundle(
            out_dir,
            name=staged.name,
            version=staged.version,
            parent_version=staged.parent_version,
            classes=staged.classes,
            input_size=staged.input_size,
            files={role: bundle.path(role) for role in (*ROLES, "checkpoint")},
            preprocessing=staged.preprocessing,
            postprocessing=post,
            quantization=staged.quantization,
            metrics=metrics,
            training=staged.training,
            overwrite=overwrite,
        )
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return manifest
