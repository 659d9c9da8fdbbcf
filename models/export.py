"""Checkpoint -> model bundle: ONNX FP32 export, INT8 quantization, metadata, manifest.

Export steps are a table (:data:`TARGETS`) of :class:`ExportTarget`; :func:`run_targets` runs
them in order, timing each, checking its output is non-empty and loads in onnxruntime, and
embedding LineGuard metadata (:mod:`models.onnx_meta`). :func:`build_bundle` runs the table
and writes the bundle (:mod:`models.bundle`) with the (optimizer-stripped) checkpoint.

torch and ultralytics are imported lazily, inside functions, and always after
:func:`models.offline.configure_offline` has made sure Ultralytics never pip-installs or
downloads anything. The packages the ONNX export needs (onnx, onnxslim, onnxruntime) are checked
up front so a missing one is a clear error. Checkpoints (facts, stripping, a dev model) are
:mod:`models.checkpoint`'s.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from models import quantize as q
from models.bundle import Manifest, Preprocessing, write_bundle
from models.checkpoint import checkpoint_info, strip_checkpoint
from models.offline import configure_offline
from models.onnx_meta import metadata_from_manifest_fields, write_metadata
from models.quant_error import sensitivity

__all__ = [
    "ONNX_OPSET",
    "TARGETS",
    "ExportContext",
    "ExportError",
    "ExportTarget",
    "StepResult",
    "build_bundle",
    "export_onnx_fp32",
    "run_targets",
]

log = logging.getLogger(__name__)

#: 17 runs on every onnxruntime >= 1.14 (agents pin >= 1.20) and has everything YOLOv8 needs.
ONNX_OPSET = 17
DEFAULT_NAME = "lineguard-detector"


class ExportError(RuntimeError):
    """An export step failed or produced an unusable file."""


# --------------------------------------------------------------------------- Ultralytics


def _require(*modules: str) -> None:
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ExportError(
            f"missing package(s) {missing} for ONNX export; install the 'train' extra "
            "(Ultralytics will not be allowed to install them itself)"
        )


def _yolo(checkpoint: str | Path):
    configure_offline()
    from ultralytics import YOLO

    return YOLO(str(checkpoint), task="detect")


# --------------------------------------------------------------------------- export steps


def _pin_spatial(onnx_path: Path, imgsz: tuple[int, int]) -> None:
    """Fix H, W of ``images`` (keep batch dynamic) and re-slim.

    Ultralytics' ``dynamic=True`` makes batch, height and width dynamic, which leaves the anchor
    grid computed in-graph (Shape/Range/Expand ...). The bundle has one input size, so pin it:
    onnxslim then folds the anchors into constants (~320 -> ~230 nodes) and shape inference,
    quantization and ORT see static spatial shapes. Batch stays dynamic.
    """
    import onnx
    import onnxslim

    model = onnx.load(str(onnx_path))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    for d, v in zip(dims[2:4], imgsz, strict=True):
        d.ClearField("dim_param")
        d.dim_value = int(v)
    props = [(p.key, p.value) for p in model.metadata_props]
    try:
        slim = onnxslim.slim(model)
    except Exception as e:  # noqa: BLE001 - the unslimmed pinned model is still valid
        log.warning("onnxslim after pinning input size failed (%s); keeping the unslimmed graph", e)
        slim = model
    if not slim.metadata_props:
        for k, v in props:
            p = slim.metadata_props.add()
            p.key, p.value = k, v
    onnx.save(slim, str(onnx_path))


def export_onnx_fp32(
    checkpoint: str | Path, out_path: str | Path, imgsz: int | tuple[int, int] = 640
) -> Path:
    """Ultralytics ONNX export (batch-dynamic, simplified, no NMS) into ``out_path``."""
    _require("onnx", "onnxslim", "onnxruntime")
    hw = (imgsz, imgsz) if isinstance(imgsz, int) else cast("tuple[int, int]", tuple(imgsz))
    out_path = Path(out_path)
    with tempfile.TemporaryDirectory(prefix="lg_export_") as tmp:
        pt = Path(tmp) / "model.pt"  # Ultralytics writes next to the .pt: keep that in tmp
        shutil.copyfile(checkpoint, pt)
        f = _yolo(pt).export(
            format="onnx",
            imgsz=list(hw),
            dynamic=True,
            simplify=True,
            nms=False,
            opset=ONNX_OPSET,
            half=False,
            device="cpu",
            verbose=False,
        )
        if not f or not Path(f).is_file():
            raise ExportError(f"Ultralytics ONNX export of {checkpoint} produced no file")
        _pin_spatial(Path(f), hw)
        shutil.move(f, out_path)
    return out_path


@dataclass
class ExportContext:
    checkpoint: Path
    work_dir: Path
    classes: list[str]
    input_size: tuple[int, int]
    version: str
    calib_dir: Path | None = None
    calib_images: int = q.DEFAULT_CALIBRATION_IMAGES
    quant_options: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, Path] = field(default_factory=dict)
    quantization: q.QuantizationReport | None = None


@dataclass(frozen=True)
class ExportTarget:
    name: str
    role: str
    fn: Callable[[ExportContext, Path], None]  # (ctx, out_path) -> writes out_path
    suffix: str = ".onnx"


@dataclass(frozen=True)
class StepResult:
    name: str
    role: str
    path: Path
    bytes: int
    seconds: float


def _t_onnx_fp32(ctx: ExportContext, out: Path) -> None:
    export_onnx_fp32(ctx.checkpoint, out, ctx.input_size)


def _t_onnx_int8(ctx: ExportContext, out: Path) -> None:
    if "onnx_fp32" not in ctx.outputs:
        raise ExportError("onnx_int8 needs the onnx_fp32 target to run first")
    if ctx.calib_dir is None:
        raise ExportError("onnx_int8 needs a calibration dataset (calib_dir)")
    ctx.quantization = q.quantize_int8(
        ctx.outputs["onnx_fp32"],
        out,
        ctx.calib_dir,
        n_images=ctx.calib_images,
        imgsz=ctx.input_size,
        **ctx.quant_options,
    )


#: The export table, run in order. Add a target (e.g. an OpenVINO IR) by appending a row.
TARGETS: tuple[ExportTarget, ...] = (
    ExportTarget("onnx_fp32", "onnx_fp32", _t_onnx_fp32),
    ExportTarget("onnx_int8", "onnx_int8", _t_onnx_int8),
)


def _check_onnx(path: Path) -> None:
    import onnxruntime as ort

    if not path.is_file() or path.stat().st_size == 0:
        raise ExportError(f"{path}: export produced an empty or missing file")
    try:
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ExportError(f"{path}: onnxruntime cannot load the exported model: {e}") from e


def run_targets(ctx: ExportContext, targets: Sequence[ExportTarget] = TARGETS) -> list[StepResult]:
    """Run ``targets`` in order; each output is checked and gets LineGuard metadata."""
    results = []
    for i, t in enumerate(targets, 1):
        out = ctx.work_dir / f"{t.name}{t.suffix}"
        log.info("[%d/%d] %s ...", i, len(targets), t.name)
        t0 = time.perf_counter()
        try:
            t.fn(ctx, out)
        except ExportError:
            raise
        except Exception as e:
            raise ExportError(f"export step {t.name!r} failed: {type(e).__name__}: {e}") from e
        _check_onnx(out)
        quant = ctx.quantization.to_manifest() if t.role == "onnx_int8" and ctx.quantization else None
        write_metadata(
            out,
            metadata_from_manifest_fields(
                ctx.classes, ctx.input_size, Preprocessing().model_dump(), quant, ctx.version
            ),
        )
        ctx.outputs[t.role] = out
        dt = time.perf_counter() - t0
        res = StepResult(t.name, t.role, out, out.stat().st_size, round(dt, 2))
        results.append(res)
        log.info("[%d/%d] %s done in %.1f s (%.1f MB)", i, len(targets), t.name, dt, res.bytes / 1e6)
    return results


def _evaluate_outputs(outputs: dict[str, Path], eval_dir: Path, split: str) -> dict[str, Any]:
    from models.dataset_io import load_dataset
    from models.evaluate import OnnxPredictor, evaluate

    dataset = load_dataset(eval_dir)
    out: dict[str, Any] = {"eval_data": str(eval_dir), "eval_split": split}
    for role in ("onnx_fp32", "onnx_int8"):
        if role in outputs:
            t0 = time.perf_counter()
            rep = evaluate(OnnxPredictor(outputs[role]), dataset, split=split, progress=False).to_dict()
            out[role] = {k: rep[k] for k in ("map50", "map50_95", "precision", "recall", "n_images")}
            log.info(
                "eval %s on %s/%s: mAP50 %.4f (%.1f s)",
                role,
                eval_dir,
                split,
                rep["map50"],
                time.perf_counter() - t0,
            )
    if "onnx_fp32" in out and "onnx_int8" in out:
        out["int8_map50_delta"] = out["onnx_int8"]["map50"] - out["onnx_fp32"]["map50"]
    return out


def build_bundle(
    checkpoint: str | Path,
    out_dir: str | Path,
    calib_dir: str | Path,
    version: str,
    parent_version: str | None = None,
    metrics: dict[str, Any] | None = None,
    *,
    name: str = DEFAULT_NAME,
    imgsz: int | tuple[int, int] | None = None,
    calib_images: int = q.DEFAULT_CALIBRATION_IMAGES,
    quant_options: dict[str, Any] | None = None,
    postprocessing: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    sensitivity_frames: int = 16,
    targets: Sequence[ExportTarget] = TARGETS,
    eval_dir: str | Path | None = None,
    eval_split: str = "val",
) -> Manifest:
    """Export ``checkpoint`` through ``targets`` and write the bundle at ``out_dir``.

    ``imgsz`` defaults to the checkpoint's training size (else 640). The INT8-vs-FP32 error on
    ``sensitivity_frames`` frames of ``calib_dir`` (val split when present) is recorded in the
    manifest's ``quantization.deltas``. With ``eval_dir`` (a YOLO dataset), both ONNX models are
    evaluated on its ``eval_split`` (:func:`models.evaluate.evaluate`) and the mAPs go into
    ``metrics`` (explicit ``metrics`` keys win).
    """
    checkpoint = Path(checkpoint)
    info = checkpoint_info(checkpoint)
    size = imgsz or info["imgsz"] or 640
    hw = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    with tempfile.TemporaryDirectory(prefix="lg_bundle_build_") as tmp:
        work = Path(tmp)
        ctx = ExportContext(
            checkpoint=checkpoint,
            work_dir=work,
            classes=info["classes"],
            input_size=hw,
            version=version,
            calib_dir=Path(calib_dir),
            calib_images=calib_images,
            quant_options=dict(quant_options or {}),
        )
        steps = run_targets(ctx, targets)
        quant = None
        if ctx.quantization is not None:
            quant = ctx.quantization.to_manifest()
            if sensitivity_frames and "onnx_fp32" in ctx.outputs:
                split = "val" if (Path(calib_dir) / "images" / "val").is_dir() else "train"
                frames = q.load_frames(
                    q.select_calibration_images(calib_dir, sensitivity_frames, split=split, seed=1)
                )
                quant["deltas"] = sensitivity(ctx.outputs["onnx_fp32"], ctx.outputs["onnx_int8"], frames)
                quant["deltas"]["split"] = split
        if eval_dir is not None:
            metrics = {**_evaluate_outputs(ctx.outputs, Path(eval_dir), eval_split), **(metrics or {})}
        pt = strip_checkpoint(checkpoint, work / "checkpoint.pt")
        train = {**info["training"], **(training or {})}
        train["export_seconds"] = {s.name: s.seconds for s in steps}
        return write_bundle(
            out_dir,
            name=name,
            version=version,
            parent_version=parent_version,
            classes=info["classes"],
            input_size=hw,
            files={**ctx.outputs, "checkpoint": pt},
            postprocessing=postprocessing,
            quantization=quant,
            metrics=metrics,
            training=train,
        )
