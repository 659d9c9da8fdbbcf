"""Add a trained bottleneck's split parts to a bundle, as a new bundle version (torch).

The new bundle holds everything the old one did, plus ``split_edge_fp32``, ``split_edge_int8``
and ``split_hub``; its manifest gains ``split`` (cut, feature spec, bottleneck, measured figures)
and ``parent_version``. Every ONNX file gets the new version in its metadata, so an agent or a head
never pairs parts of two versions; the bottleneck is versioned with the bundle.

    lineguard-model split --bundle models/default --bottleneck runs/split/c4w16b4s2t.pt \\
        --data data/synth/dataset --version 1.1.0 --out models/default --overwrite
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from models.bundle import Bundle, Manifest, load_bundle, write_bundle
from models.feature_codec import FeatureSpec
from models.onnx_meta import read_metadata, write_metadata

__all__ = ["add_split_parts", "export_bottleneck"]

log = logging.getLogger(__name__)


def export_bottleneck(bundle: Bundle, bottleneck: Path, out_dir: Path, data: Path, *,
                      version: str,
                      int8: bool = True) -> tuple[dict[str, Path], FeatureSpec, dict[str, Any], dict[str, Any]]:
    """The split parts of ``bundle``'s checkpoint with a trained bottleneck (and the hub layers it
    tuned), as ``version``: ``(paths by role, spec, export report, training info)``. ``int8=False``:
    FP32 parts only (``split_edge_fp32``, ``split_hub`` unquantized; for reports)."""
    from models.offline import configure_offline, patch_ultralytics

    configure_offline()
    from ultralytics import YOLO

    from models.split_export import export_split_parts
    from models.split_train import apply_hub_tuning, load_bottleneck

    patch_ultralytics()
    m = bundle.manifest
    bn, info = load_bottleneck(bottleneck)
    model = YOLO(str(bundle.path("checkpoint")), task="detect").model
    apply_hub_tuning(model, info)
    paths, spec, report = export_split_parts(
        model, bn, info["cut"], out_dir, imgsz=(int(m.input_size[0]), int(m.input_size[1])),
        classes=list(m.classes), version=version, calib_data=data if int8 else None,
        preprocessing=m.preprocessing.model_dump())
    return paths, spec, report, info


def add_split_parts(bundle_dir: Path, bottleneck: Path, data: Path, *, version: str, out: Path,
                    overwrite: bool = False, metrics: dict[str, Any] | None = None,
                    parent_version: str | None = None) -> Manifest:
    """``bundle_dir`` plus the split parts of ``bottleneck``, as ``version`` in ``out``; the parent
    is ``bundle_dir``'s version unless ``parent_version`` says otherwise (the bundle itself,
    given its split parts in place)."""
    bundle = load_bundle(bundle_dir, roles=("onnx_fp32", "onnx_int8", "checkpoint"))
    m = bundle.manifest
    with tempfile.TemporaryDirectory(prefix="lg_split_") as tmp:
        work = Path(tmp)
        paths, spec, report, info = export_bottleneck(bundle, bottleneck, work / "parts", data, version=version)
        files: dict[str, Path] = {}
        for role in ("onnx_fp32", "onnx_int8"):  # same weights, new version in their metadata
            dst = work / f"{role}.onnx"
            shutil.copyfile(bundle.path(role), dst)
            write_metadata(dst, {"bundle_version": version})
            files[role] = dst
        files["checkpoint"] = bundle.path("checkpoint")
        files.update(paths)
        files["split_bottleneck"] = bottleneck
        split = {
            "cut": info["cut"],
            "spec": spec.to_dict(),
            "bottleneck": {k: info.get(k) for k in ("width", "bits", "stride", "hidden", "channels", "crossing",
                                                    "imgsz")},
            "training": {k: info.get(k) for k in ("steps", "batch", "lr", "train_images", "seconds", "device",
                                                  "tune_hub", "crop", "kd", "steps_done")},
            "export": report,
            "metrics": metrics or {},
        }
        manifest = write_bundle(
            out, name=m.name, version=version, parent_version=parent_version or m.version, classes=m.classes,
            input_size=m.input_size, files=files, preprocessing=m.preprocessing, postprocessing=m.postprocessing,
            quantization=m.quantization, metrics=m.metrics, training=m.training, split=split,
            overwrite=overwrite)
    for role in ("split_edge_int8", "split_hub"):
        meta = json.loads(read_metadata(out / manifest.files[role].path)["split"])  # type: ignore[index]
        if meta["role"] != role:
            raise RuntimeError(f"{role}: metadata says {meta['role']}")
    log.info("bundle %s v%s: split at cut %d, codes %s at %d bits", out, version, spec.cut, spec.shape, spec.bits)
    return manifest
