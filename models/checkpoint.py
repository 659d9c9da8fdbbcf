"""Ultralytics checkpoints: their facts (classes, training), stripped for a bundle, and a
random-init dev model for tests (torch and ultralytics, imported lazily, offline)."""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from models.offline import configure_offline
from models.taxonomy import DEFAULT_CLASSES

__all__ = ["CheckpointError", "checkpoint_info", "checkpoint_model", "load_checkpoint", "make_dev_checkpoint",
           "model_classes", "strip_checkpoint"]

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """Not an Ultralytics checkpoint, or a dev model this module cannot build."""


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """An Ultralytics checkpoint's dict (torch, on the CPU); :class:`CheckpointError` when it is not one."""
    import torch

    ckpt = torch.load(str(path), map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(f"{path}: not an Ultralytics checkpoint (no 'model' entry)")
    return ckpt


def checkpoint_model(ckpt: dict[str, Any]) -> Any:
    """The network a checkpoint's weights are read from: its EMA when training left one, else ``model``."""
    return ckpt.get("ema") or ckpt["model"]


def model_classes(model: Any) -> list[str]:
    """A detection model's class names in id order."""
    names = getattr(model, "names", None) or {}
    ids = sorted(names) if isinstance(names, dict) else range(len(names))
    return [str(names[i]) for i in ids]


def checkpoint_info(checkpoint: str | Path) -> dict[str, Any]:
    """Class names (id order) and training facts of an Ultralytics checkpoint."""
    configure_offline()
    ckpt = load_checkpoint(checkpoint)
    classes = model_classes(checkpoint_model(ckpt))
    args = dict(ckpt.get("train_args") or {})
    training = {
        k: args[k] for k in ("data", "epochs", "imgsz", "batch", "optimizer", "seed", "model") if k in args
    }
    for k in ("epoch", "best_fitness", "date", "version"):
        if ckpt.get(k) is not None:
            training["ultralytics_version" if k == "version" else k] = ckpt[k]
    metrics = {k: float(v) for k, v in (ckpt.get("train_metrics") or {}).items()
               if v is not None and math.isfinite(float(v))}
    if metrics:  # a training without validation has none (NaN, fitness None)
        training["train_metrics"] = metrics
    return {
        "classes": classes,
        "imgsz": args.get("imgsz"),
        "has_optimizer": ckpt.get("optimizer") is not None,
        "has_ema": ckpt.get("ema") is not None,
        "training": training,
    }


def strip_checkpoint(src: str | Path, dst: str | Path) -> Path:
    """Copy ``src`` to ``dst`` without optimizer/EMA state (Ultralytics' ``strip_optimizer``).

    A ``best.pt`` from a finished Ultralytics training is already stripped and is copied as is.
    """
    src, dst = Path(src), Path(dst)
    info = checkpoint_info(src)
    if info["has_optimizer"] or info["has_ema"]:
        from ultralytics.utils.torch_utils import strip_optimizer

        strip_optimizer(str(src), str(dst))
        log.info("stripped optimizer/EMA state: %s -> %s", src, dst)
    else:
        shutil.copyfile(src, dst)
    return dst


def make_dev_checkpoint(
    path: str | Path,
    classes: Sequence[str] = DEFAULT_CLASSES,
    *,
    cfg: str = "yolov8n.yaml",
    seed: int = 0,
    bn_frames: Sequence[np.ndarray] | None = None,
    imgsz: int = 640,
) -> Path:
    """A random-init (0 epochs) YOLO detector checkpoint with ``len(classes)`` classes.

    Saved with ``YOLO.save`` (the same dict layout Ultralytics' trainer writes, FP16 weights).
    A purely random-init YOLOv8 emits a constant output (head biases only): every deep feature
    is ~0 with default BatchNorm statistics. ``bn_frames`` (BGR images) re-estimates BatchNorm
    running statistics on them (no weight is trained), which makes the outputs depend on the
    input, so quantization error can actually be measured on a dev model.
    """
    configure_offline()
    import torch
    import yaml
    from ultralytics import YOLO
    from ultralytics.utils import ROOT

    path = Path(path)
    torch.manual_seed(seed)
    base = yaml.safe_load((ROOT / "cfg" / "models" / "v8" / "yolov8.yaml").read_text())
    if cfg.startswith("yolov8") and cfg.endswith(".yaml"):
        base["nc"] = len(classes)
        with tempfile.TemporaryDirectory(prefix="lg_cfg_") as tmp:
            cfg_path = Path(tmp) / cfg  # the file stem carries the scale ('n') for Ultralytics
            cfg_path.write_text(yaml.safe_dump(base))
            # Any: ultralytics infers Model.model as "str | None"; it is the nn.Module once built.
            model: Any = YOLO(str(cfg_path), task="detect")
    else:
        raise CheckpointError(f"unsupported dev cfg {cfg!r} (a yolov8[nsmlx].yaml name)")
    model.model.names = dict(enumerate(classes))
    if bn_frames:
        from models.processing import preprocess_batch

        net = model.model
        bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average over the frames
        net.train()
        with torch.no_grad():
            for i in range(0, len(bn_frames), 8):
                x, _ = preprocess_batch(list(bn_frames[i : i + 8]), imgsz)
                net(torch.from_numpy(x))
        for bn in bns:
            bn.momentum = 0.03
        net.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save(str(path))
    return path
