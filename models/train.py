"""Train the detector with Ultralytics, from scratch, fully offline.

Presets are the recipes a bundle is reproduced from: ``lineguard-model train --preset default``
gives the shipped default model (given the same data, seed and hardware class).
torch and ultralytics are imported lazily: they belong to the ``train`` extra only.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from models.crops import CropPlan
from models.offline import configure_offline, patch_ultralytics, restore_torch_threads

__all__ = ["RECIPES", "TrainPreset", "PRESETS", "train", "train_recipe", "TrainResult"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainPreset:
    """One training recipe. ``overrides`` go to Ultralytics' ``model.train`` unchanged."""

    name: str
    model_cfg: str = "yolov8n.yaml"
    imgsz: int = 640
    epochs: int = 60
    batch: int = 32
    data_preset: str = "default"
    overrides: dict[str, Any] = field(default_factory=dict)
    #: False: Ultralytics never validates (not after the last epoch, which it does even with
    #: ``val=False``, nor once more after training); the last epoch is the result, as for a caller
    #: that scores it itself (the retraining job's release step scores the validation split with the
    #: exported models). The checkpoints are stripped of the optimizer state all the same. Saves
    #: 2-7 s per job on an H100 (the validation loader spawns twice the training's workers).
    validate: bool = True
    #: Train on crops of the training frames at the model's scale (:mod:`models.crops`), ``imgsz``
    #: being the crop's side: the caller building the dataset crops its training split.
    crop: CropPlan | None = None


_AUGMENT = {
    # The camera is fixed and looks straight down: parts may appear mirrored and at any
    # in-plane angle, but never upside-down in perspective or at another scale range.
    "fliplr": 0.5,
    "flipud": 0.5,
    "degrees": 0.0,
    "scale": 0.3,
    "translate": 0.1,
    "mosaic": 1.0,
    "close_mosaic": 10,
    "hsv_h": 0.015,
    "hsv_s": 0.5,
    "hsv_v": 0.4,
}

PRESETS: dict[str, TrainPreset] = {
    # The shipped default model: YOLOv8n from scratch on the synthetic line (trained on a GPU).
    # Trained square at 960 (mosaic needs square tiles); exported for 16:9 frames at 544x960,
    # where a 1280x720 frame is scaled by 0.75 and a 1920x1080 frame by 0.5.
    "default": TrainPreset(
        name="default", imgsz=960, epochs=80, batch=64,
        overrides={**_AUGMENT, "patience": 30, "cos_lr": True},
    ),
    # Stage 2 of the default recipe: continue from stage 1's best.pt (``--weights``) at a low,
    # decaying learning rate. Stage 1 alone stopped at val mAP50 0.961 in 7.5 min on an H100.
    "default-finetune": TrainPreset(
        name="default-finetune", imgsz=960, epochs=40, batch=64,
        overrides={**_AUGMENT, "patience": 30, "cos_lr": True, "optimizer": "AdamW", "lr0": 0.0005,
                   "lrf": 0.05, "warmup_epochs": 1},
    ),
    # The hub's incremental retraining (hub/retrain.py): from the production checkpoint, on the
    # reviewed samples plus a replay buffer, at a low learning rate so old classes are kept
    # (lr 1e-3 cost the golden set 1.3-5.3 mAP50 points on the cover line, 5e-4 with 600 replay
    # frames 0.47). Every layer trains: with layers 0-4 frozen a new product (painted covers) was
    # not learned (cover test mAP50 0.40 after 20 epochs, 0.91 with nothing frozen;
    # docs/benchmarks.md); a split model's bottleneck is then fine-tuned to the new first layers
    # (models/split_rebuild.py). Not validated by Ultralytics (the release step scores the last
    # epoch, the gate judges it). Batch 64 took half the seconds per epoch on an H100 but learned the
    # cover line less well (part recall 93.6% against 95.2-95.7%, docs/benchmarks.md): batch 16.
    "retrain": TrainPreset(
        name="retrain", imgsz=960, epochs=20, batch=16,
        overrides={**_AUGMENT, "close_mosaic": 3, "optimizer": "AdamW", "lr0": 0.0005, "lrf": 0.1,
                   "warmup_epochs": 0.5, "patience": 0, "plots": False, "freeze": 0, "val": False},
        validate=False,
    ),
    # The same on a hub without a GPU (the 2-core CPU target): on 320 px crops of the frames scaled
    # as the agents letterbox them (models/crops.py: one crop per labelled box not already inside
    # another, one random crop per frame; reviewed frames placed twice), a fifth of a 544x960
    # frame's pixels each; no mosaic (the crops already put each object whole at a random place).
    # Layers 0-4 frozen: the device part of a split model stays valid with production's bottleneck
    # (fine-tuning it would take hours here), and a new defect class was learned so on the GPU
    # (porosity 94.0%, golden -0.43 mAP50, session 6; docs/benchmarks.md). 15 epochs: what the
    # job's 0.28-hour budget gave on the 2-core build machine for 200 reviews + 600 replay frames
    # (1,742 crops; 39-40 s per epoch on both cores, job 679-683 s; 20 epochs forgot more and learned
    # no more). A slower CPU (75-78 s per epoch on another 2-core machine) needs the hub's ``hours``
    # (0.28: Ultralytics fits the epochs into it) to stay within 20 minutes, as does larger data.
    "retrain-cpu": TrainPreset(
        name="retrain-cpu", imgsz=320, epochs=15, batch=16,
        crop=CropPlan(size=320, input_hw=(544, 960), new_data_repeats=2),
        overrides={**_AUGMENT, "mosaic": 0.0, "close_mosaic": 0, "optimizer": "AdamW", "lr0": 0.001, "lrf": 0.1,
                   "warmup_epochs": 0.5, "patience": 0, "plots": False, "freeze": 5, "val": False},
        validate=False,
    ),
    # Retraining at CI scale (tests): one epoch on 96 px crops of frames scaled into a 160 px
    # input, as ``retrain-cpu`` does at 320 and 544x960.
    "retrain-ci": TrainPreset(
        name="retrain-ci", imgsz=96, epochs=1, batch=4, crop=CropPlan(size=96, input_hw=(160, 160)),
        overrides={**_AUGMENT, "mosaic": 0.0, "close_mosaic": 0, "plots": False, "val": False,
                   "optimizer": "AdamW", "lr0": 0.0005, "warmup_epochs": 0, "freeze": 10},
        validate=False,
    ),
    # A quick model for tests and CI: a few minutes on 2 CPU cores.
    "ci": TrainPreset(
        name="ci",
        imgsz=320,
        epochs=2,
        batch=8,
        data_preset="small",
        overrides={**_AUGMENT, "mosaic": 0.0, "close_mosaic": 0, "plots": False, "val": False},
    ),
}


def _has_polars() -> bool:
    try:
        import polars  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class TrainResult:
    checkpoint: Path
    run_dir: Path
    preset: TrainPreset
    metrics: dict[str, float]

    def summary(self) -> dict[str, Any]:
        return {"checkpoint": str(self.checkpoint), "run_dir": str(self.run_dir),
                "preset": asdict(self.preset), "metrics": self.metrics}


def train(
    data_yaml: Path,
    preset: str | TrainPreset = "default",
    project_dir: Path = Path("runs/train"),
    device: str | None = None,
    epochs: int | None = None,
    hours: float | None = None,
    workers: int = 8,
    seed: int = 0,
    resume: bool = False,
    weights: Path | None = None,
    **extra: Any,
) -> TrainResult:
    """Train from scratch on ``data_yaml`` and return the best checkpoint.

    ``hours`` caps wall time (Ultralytics' ``time`` argument, which then fits the schedule).
    ``weights`` continues from an earlier checkpoint of ours (a second stage) instead of the
    preset's architecture YAML; nothing pretrained from elsewhere is ever loaded.
    """
    cfg = PRESETS[preset] if isinstance(preset, str) else preset
    if epochs is not None:
        cfg = replace(cfg, epochs=epochs)
    configure_offline()
    from ultralytics import YOLO  # lazy: the train extra

    patch_ultralytics()
    project_dir = Path(project_dir).resolve()
    run_name = cfg.name
    if resume:
        last = project_dir / run_name / "weights" / "last.pt"
        if not last.exists():
            raise FileNotFoundError(f"cannot resume: {last} does not exist")
        # Any: ultralytics infers Model.trainer as None (it is set by train()).
        model: Any = YOLO(str(last))
        args: dict[str, Any] = {"resume": True}
    else:
        model = YOLO(str(weights) if weights else cfg.model_cfg)
        args = {
            "data": str(Path(data_yaml).resolve()),
            "imgsz": cfg.imgsz,
            "epochs": cfg.epochs,
            "batch": cfg.batch,
            "workers": workers,
            "seed": seed,
            "deterministic": True,
            "pretrained": bool(weights),
            "project": str(project_dir),
            "name": run_name,
            "exist_ok": True,
            "verbose": True,
            **cfg.overrides,
            **extra,
        }
        if device is not None:
            args["device"] = device
        if hours is not None:
            args["time"] = hours
        if args.get("plots", True) and not _has_polars():
            log.warning("polars is not installed: training without Ultralytics' plots")
            args["plots"] = False
    if not cfg.validate:
        model.add_callback("on_pretrain_routine_start", _without_validation)
    model.add_callback("on_pretrain_routine_start", _cpu_threads)
    _log_times(model)
    results = model.train(**args)
    save_dir = Path(model.trainer.save_dir)
    best = save_dir / "weights" / "best.pt"
    if not best.exists():  # training without validation keeps only last.pt
        best = save_dir / "weights" / "last.pt"
    metrics = ({k: float(v) for k, v in (getattr(results, "results_dict", None) or {}).items()}
               if cfg.validate else {})
    log.info("trained %s -> %s %s", cfg.name, best, metrics)
    return TrainResult(checkpoint=best, run_dir=save_dir, preset=cfg, metrics=metrics)


def _log_times(model: Any) -> None:
    """Log where training's time goes: setting up (model, data, loaders), the first batch, each epoch."""
    marks: dict[str, float] = {}

    def start(trainer: Any) -> None:
        marks["start"] = marks["epoch"] = time.perf_counter()

    def train_start(trainer: Any) -> None:
        log.info("training set up in %.1f s", time.perf_counter() - marks["start"])
        marks["epoch"] = time.perf_counter()

    def batch_end(trainer: Any) -> None:
        if "first" not in marks:
            marks["first"] = time.perf_counter()
            log.info("first training batch done %.1f s after the start", marks["first"] - marks["start"])

    def epoch_end(trainer: Any) -> None:
        now = time.perf_counter()
        log.info("epoch %d/%d: %.1f s", trainer.epoch + 1, trainer.epochs, now - marks["epoch"])
        marks["epoch"] = now

    for event, fn in (("on_pretrain_routine_start", start), ("on_train_start", train_start),
                      ("on_train_batch_end", batch_end), ("on_train_epoch_end", epoch_end)):
        model.add_callback(event, fn)


def _cpu_threads(trainer: Any) -> None:
    """Train on a CPU with a thread per core (:func:`restore_torch_threads`): Ultralytics' device
    selection leaves one thread fewer than the cores, on a 2-core hub one core for the whole training
    while the other idles (Ultralytics loads the data in the training thread on a CPU). A GPU
    training is left as it is."""
    if getattr(trainer.device, "type", None) == "cpu":
        restore_torch_threads()


def _without_validation(trainer: Any) -> None:
    """No validation in Ultralytics' trainer: ``validate`` returns no metrics and no fitness (each
    epoch's checkpoint is then also ``best.pt``: the last epoch is the result), and ``final_eval``
    only strips the checkpoints of the optimizer state, as Ultralytics ships them."""
    from ultralytics.utils.torch_utils import strip_optimizer

    def validate() -> tuple[dict[str, float], None]:
        # NaN under the columns the trainer has logged (0 until now, as Ultralytics does without
        # ``val``): results.csv stays rectangular and says "not measured"
        return {k: math.nan for k in (trainer.metrics or {})}, None

    def final_eval() -> None:
        ckpt = strip_optimizer(trainer.last) if trainer.last.exists() else {}
        if trainer.best.exists():
            strip_optimizer(trainer.best, updates={"train_results": ckpt.get("train_results")})

    trainer.validate = validate
    trainer.final_eval = final_eval


#: Presets that train in stages: each stage continues from the previous stage's best checkpoint,
#: with its share of ``hours``. The shipped default model is ``default`` then ``default-finetune``
#: (7.5 + 6.9 min on an H100; docs/model.md).
RECIPES: dict[str, tuple[tuple[str, float], ...]] = {
    "default": (("default", 0.52), ("default-finetune", 0.48)),
}


def train_recipe(
    data_yaml: Path,
    preset: str = "default",
    hours: float | None = None,
    weights: Path | None = None,
    stages: Sequence[str] | None = None,
    train_fn: Callable[..., TrainResult] | None = None,
    **kwargs: Any,
) -> list[TrainResult]:
    """Run ``preset``'s stages (one stage for a preset without a recipe); the last result is the model.

    ``stages`` picks a subset by preset name (e.g. only ``default-finetune`` with ``weights``).
    """
    fn = train_fn or train
    plan = RECIPES.get(preset, ((preset, 1.0),))
    if stages:
        unknown = set(stages) - {name for name, _ in plan}
        if unknown:
            raise ValueError(f"stages {sorted(unknown)} are not in recipe {preset!r}: {[n for n, _ in plan]}")
        plan = tuple((n, share) for n, share in plan if n in stages)
    results: list[TrainResult] = []
    for name, share in plan:
        stage_hours = hours * share if hours is not None else None
        result = fn(data_yaml, preset=name, hours=stage_hours, weights=weights, **kwargs)
        log.info("stage %s done: %s", name, result.checkpoint)
        results.append(result)
        weights = result.checkpoint
    return results
