"""Distil a bottleneck at a cut from the unsplit model (torch; the ``train`` extra).

The detector stays frozen (eval mode, no gradient to its weights); only the bottleneck learns.

- Stage 1, feature matching: MSE between the reconstructed map and the teacher's map at the cut,
  plus MSE between the student's and the teacher's three Detect inputs (neck outputs).
- Stage 2, detection loss: Ultralytics' own ``v8DetectionLoss`` on the ground-truth boxes of the
  synthetic line, with the feature-matching terms kept at a lower weight.

The result is a small ``.pt`` (:func:`save_bottleneck`) that :mod:`models.split_export` turns into
the bundle's two ONNX parts.

    python -m models.split_train --data data/synth --cut 4 --width 8 --bits 4 --out runs/split/c4w8b4.pt
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from models.bottleneck import Bottleneck, crossing_channels, detection_model, spec_for
from models.dataset_io import load_dataset
from models.processing import letterbox, scale_boxes_to_input
from models.split import EdgePart, HubPart

__all__ = ["apply_hub_tuning", "deterministic_torch", "load_bottleneck", "load_letterboxed", "save_bottleneck",
           "train_bottleneck"]

log = logging.getLogger(__name__)


def load_letterboxed(data_dir: Path, split: str, imgsz: tuple[int, int], limit: int | None = None,
                     seed: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    """Images letterboxed to ``imgsz`` (N, H, W, 3 RGB uint8) and labels ``[cls, cx, cy, w, h]``
    normalised to the letterboxed input."""
    samples = load_dataset(data_dir, splits=[split]).split(split)
    if limit and len(samples) > limit:
        idx = np.random.default_rng(seed).choice(len(samples), limit, replace=False)
        samples = [samples[i] for i in sorted(idx)]
    h, w = imgsz
    images = np.empty((len(samples), h, w, 3), np.uint8)
    labels = []
    for i, s in enumerate(tqdm(samples, desc=f"load {split}", leave=False)):
        img, info = letterbox(s.read(), imgsz)
        images[i] = img[:, :, ::-1]
        lab = s.labels
        boxes = scale_boxes_to_input(lab[:, 1:5], info) if len(lab) else np.zeros((0, 4), np.float32)
        cxcywh = np.stack([(boxes[:, 0] + boxes[:, 2]) / 2 / w, (boxes[:, 1] + boxes[:, 3]) / 2 / h,
                           (boxes[:, 2] - boxes[:, 0]) / w, (boxes[:, 3] - boxes[:, 1]) / h], 1)
        labels.append(np.concatenate([lab[:, :1], cxcywh], 1).astype(np.float32))
    return images, labels


def _batch_targets(labels: list[np.ndarray], idx: np.ndarray, device: torch.device) -> dict[str, torch.Tensor]:
    rows = [np.concatenate([np.full((len(labels[j]), 1), k, np.float32), labels[j]], 1)
            for k, j in enumerate(idx) if len(labels[j])]
    t = torch.from_numpy(np.concatenate(rows) if rows else np.zeros((0, 6), np.float32)).to(device)
    return {"batch_idx": t[:, 0], "cls": t[:, 1:2], "bboxes": t[:, 2:6]}


def _crop_labels(lab: np.ndarray, imgsz: tuple[int, int], window: tuple[int, int, int, int]) -> np.ndarray:
    """Normalised ``[cls, cx, cy, w, h]`` of the full input -> of the crop window (clipped; boxes
    keeping under 30% of their area are dropped)."""
    if not len(lab):
        return lab
    h, w = imgsz
    y0, x0, ch, cw = window
    x1, y1 = (lab[:, 1] - lab[:, 3] / 2) * w - x0, (lab[:, 2] - lab[:, 4] / 2) * h - y0
    x2, y2 = (lab[:, 1] + lab[:, 3] / 2) * w - x0, (lab[:, 2] + lab[:, 4] / 2) * h - y0
    cx1, cy1, cx2, cy2 = x1.clip(0, cw), y1.clip(0, ch), x2.clip(0, cw), y2.clip(0, ch)
    keep = (cx2 - cx1) * (cy2 - cy1) >= 0.3 * np.maximum((x2 - x1) * (y2 - y1), 1e-6)
    out = np.stack([lab[:, 0], (cx1 + cx2) / 2 / cw, (cy1 + cy2) / 2 / ch, (cx2 - cx1) / cw, (cy2 - cy1) / ch], 1)
    return out[keep].astype(np.float32)


@contextlib.contextmanager
def deterministic_torch(seed: int = 0) -> Iterator[None]:
    """PyTorch's deterministic algorithms, cuDNN's deterministic convolutions and a seeded RNG inside
    the block; the process's previous settings (and CPU random stream) after it.
    ``CUBLAS_WORKSPACE_CONFIG`` is set if it is not: cuBLAS reads it when a process first uses it,
    which for the bottleneck's process (:func:`models.split_rebuild._prepare_in_child`) is inside
    this block."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    rng = torch.random.get_rng_state()
    torch.use_deterministic_algorithms(True, warn_only=True)  # warn where an op has no deterministic kernel
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[2], before[3]
        torch.random.set_rng_state(rng)


@deterministic_torch()
def train_bottleneck(model: Any, images: np.ndarray, labels: list[np.ndarray], *, cut: int, width: int, bits: int,
                     stride: int = 2, steps1: int = 1500, steps2: int = 1500, batch: int = 16, lr: float = 2e-3,
                     device: str = "cpu", progress: bool = True,
                     seconds: float | None = None, tune_hub: float = 0.0,
                     crop: int | None = None, hidden: int | None = None,
                     kd: float = 0.0, init: Bottleneck | None = None,
                     hub_init: dict[str, torch.Tensor] | None = None) -> tuple[Bottleneck, dict[str, Any]]:
    """Train a bottleneck at ``cut`` on ``images``/``labels`` (from :func:`load_letterboxed`).

    ``tune_hub`` > 0 also trains the hub-side layers in stage 2 at ``lr * tune_hub`` (batch norm
    statistics stay frozen); their weights are then part of the result (``info["hub_tuned"]``).
    ``hidden`` widens the encoder and decoder (default: the crossing map's channels). ``kd`` > 0
    adds output distillation at that weight: binary cross-entropy of the student's class logits
    against the teacher's probabilities plus MSE of the box-distribution logits, per anchor.
    With ``seconds``, the step counts are scaled (keeping their ratio) so that training takes
    about that long, from the time of steps 5 to 25. ``init`` starts from a trained bottleneck's
    weights (a retraining changed the layers before the cut: fine-tune, usually with ``steps1=0``).
    ``hub_init`` (a hub-layer state, as ``info["hub_tuned"]``) is where the tuned hub layers start;
    the teacher keeps the model's own.

    Deterministic (:func:`deterministic_torch`): the same inputs give the same weights on a GPU too,
    so that the gate's verdict on a candidate's split parts does not change from run to run (the
    split check moved by 0.4 mAP50 points between two runs of one candidate before, 2026-11-24)."""
    dev = torch.device(device)
    det = detection_model(model).float().to(dev).eval()
    for p in det.parameters():
        p.requires_grad_(False)
    det.args = SimpleNamespace(box=7.5, cls=0.5, dfl=1.5)
    imgsz = images.shape[1:3]
    c, h, w = crossing_channels(det, cut, imgsz)
    if h % stride or w % stride:
        raise ValueError(f"cut {cut}: map {h}x{w} is not divisible by stride {stride}")
    layers = det.model
    edge, hub = EdgePart(layers, cut, [cut]).eval(), HubPart(layers, cut, [cut]).eval()
    # the teacher's hub side stays as it is even when the student's hub layers are tuned
    teacher_hub = HubPart(copy.deepcopy(layers), cut, [cut]).eval() if tune_hub > 0 else hub
    if hub_init is not None:
        if tune_hub <= 0:
            raise ValueError("hub_init is where the hub layers' tuning starts: it needs tune_hub > 0")
        hub.layers.load_state_dict(hub_init)
    bn = Bottleneck(c, width, bits, stride, hidden)
    if init is not None:
        bn.load_state_dict(init.state_dict())
    bn = bn.to(dev).train()
    from ultralytics.utils.loss import v8DetectionLoss

    crit = v8DetectionLoss(det)
    opt = torch.optim.AdamW(bn.parameters(), lr=lr, weight_decay=1e-4)
    total = steps1 + steps2
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    if device.startswith("cuda"):
        # no cuDNN autotuning: on an H100 it cost a fresh process seconds and the tuned steps were no
        # faster (120 steps at batch 16: 7.0 s tuned, 6.4 s untuned, 2026-11-24)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    gpu_images = torch.from_numpy(images).to(dev)  # uint8 NHWC; a few GB on a GPU at most
    rng = np.random.default_rng(0)
    history: list[dict[str, float]] = []
    t0 = time.perf_counter()
    bar = tqdm(total=total, desc=f"cut {cut} width {width} bits {bits}", disable=not progress)
    step = 0
    t_warm = t0
    while step < total:
        if seconds and step == 5:
            t_warm = time.perf_counter()  # the first steps include cuDNN autotuning: not timed
        if seconds and step == 25:  # re-plan from the measured step time
            per = (time.perf_counter() - t_warm) / 20
            scale = max((seconds - (t_warm - t0)) / per, 30) / total
            steps1, steps2 = max(10, round(steps1 * scale)), max(10, round(steps2 * scale))
            total = steps1 + steps2
            bar.total = total
            log.info("cut %d width %d: %.0f ms/step -> %d + %d steps", cut, width, per * 1e3, steps1, steps2)
        if seconds and step > 25 and time.perf_counter() - t0 > 1.25 * seconds:  # step time grew (shared GPU)
            log.warning("cut %d width %d: past 1.25x the %.0f s budget at step %d of %d: stopping here",
                        cut, width, seconds, step, total)
            break
        idx = rng.choice(len(images), batch, replace=False)
        x = gpu_images[torch.from_numpy(idx).to(dev)].permute(0, 3, 1, 2).float() / 255
        labs = [labels[j].copy() for j in idx]
        if crop:  # one random window for the batch (multiples of 32), boxes clipped to it
            ch, cw = min(crop, imgsz[0]), min(crop, imgsz[1])
            y0 = 32 * int(rng.integers(0, (imgsz[0] - ch) // 32 + 1))
            x0 = 32 * int(rng.integers(0, (imgsz[1] - cw) // 32 + 1))
            x = x[:, :, y0:y0 + ch, x0:x0 + cw]
            labs = [_crop_labels(lab, imgsz, (y0, x0, ch, cw)) for lab in labs]
        if rng.random() < 0.5:  # horizontal flip (labels flipped below)
            x = x.flip(3)
            flipped = True
        else:
            flipped = False
        with torch.no_grad():
            (f,) = edge(x)
            _, t_preds = teacher_hub(f)
        f_hat = bn(f)
        _, s_preds = hub(f_hat)
        fm = F.mse_loss(f_hat, f) + sum(F.mse_loss(a, b) for a, b in zip(s_preds["feats"], t_preds["feats"],
                                                                          strict=True))
        if kd > 0:
            fm = fm + kd * (F.binary_cross_entropy_with_logits(s_preds["scores"], t_preds["scores"].sigmoid())
                            + 0.1 * F.mse_loss(s_preds["boxes"], t_preds["boxes"]))
        loss = fm
        det_loss = torch.zeros((), device=dev)
        if step == steps1:  # stage 2: exact rounding (straight-through), optionally the hub layers too
            bn.quant_mode = "ste"
            if tune_hub > 0:
                hub_params = [p for n, p in hub.named_parameters() if ".dfl." not in n]
                for p in hub_params:
                    p.requires_grad_(True)
                opt.add_param_group({"params": hub_params, "lr": lr * tune_hub, "initial_lr": lr * tune_hub})
                sched = torch.optim.lr_scheduler.LambdaLR(opt, [sched.lr_lambdas[0]] * 2, last_epoch=step - 1)
        if step >= steps1:
            if flipped:
                for lab in labs:
                    lab[:, 1] = 1.0 - lab[:, 1]
            targets = _batch_targets(labs, np.arange(len(idx)), dev)
            det_loss, _ = crit(s_preds, targets)
            det_loss = det_loss.sum() / batch
            loss = 0.25 * fm + det_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == total - 1:
            history.append({"step": step, "feature_mse": fm.item(), "det_loss": det_loss.item()})
            bar.set_postfix_str(f"fm {fm.item():.4f} det {det_loss.item():.3f}")
        bar.update(1)
        step += 1
    bar.close()
    bn.eval()
    for p in det.parameters():
        p.requires_grad_(False)
    spec = spec_for(cut, bn, (c, h, w))
    info = {"cut": cut, "width": width, "bits": bits, "stride": stride, "hidden": bn.hidden, "kd": kd, "channels": c,
            "crossing": [c, h, w], "imgsz": list(imgsz), "steps": [steps1, steps2], "steps_done": step,
            "device": device, "batch": batch, "lr": lr,
            "train_images": len(images),
            "seconds": round(time.perf_counter() - t0, 1), "spec": spec.to_dict(), "history": history,
            "tune_hub": tune_hub, "crop": crop}
    if tune_hub > 0:
        info["hub_tuned"] = {k: v.detach().cpu().clone() for k, v in hub.layers.state_dict().items()}
    return bn.cpu(), info


def save_bottleneck(path: Path, bn: Bottleneck, info: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    meta = {k: v for k, v in info.items() if k != "hub_tuned"}
    hub = info.get("hub_tuned")
    if hub is not None:  # FP16 like Ultralytics' checkpoints: half the bytes; exports are made from these values
        hub = {k: v.half() if v.is_floating_point() else v for k, v in hub.items()}
    torch.save({"info": meta, "state_dict": bn.state_dict(), "hub_layers": hub}, tmp)
    tmp.replace(path)
    return path


def load_bottleneck(path: Path) -> tuple[Bottleneck, dict[str, Any]]:
    raw = torch.load(path, map_location="cpu", weights_only=True)
    info = raw["info"]
    bn = Bottleneck(info["channels"], info["width"], info["bits"], info["stride"], info.get("hidden"))
    bn.load_state_dict(raw["state_dict"])
    if raw.get("hub_layers") is not None:
        hub = raw["hub_layers"]
        info = {**info, "hub_tuned": {k: v.float() if v.is_floating_point() else v for k, v in hub.items()}}
    return bn.eval(), info


def apply_hub_tuning(model: Any, info: dict[str, Any]) -> None:
    """Load the hub-side layer weights a ``tune_hub`` run trained into ``model`` (in place)."""
    state = info.get("hub_tuned")
    if state is None:
        return
    det = detection_model(model)
    HubPart(det.model, info["cut"], [info["cut"]]).layers.load_state_dict(state)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, default=Path("models/default/checkpoint.pt"))
    ap.add_argument("--data", type=Path, default=Path("data/synth"))
    ap.add_argument("--imgsz", default="544x960")
    ap.add_argument("--configs", nargs="+", default=["4:8:4"], help="cut:width:bits[:stride[:hidden]] ...")
    ap.add_argument("--images", type=int, default=2000, help="training images (a random subset)")
    ap.add_argument("--steps1", type=int, default=1500)
    ap.add_argument("--steps2", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--crop", type=int, default=None, help="train on random square crops of this size (CPU)")
    ap.add_argument("--tune-hub", type=float, default=0.0, help="stage 2 also trains the hub layers at lr x this")
    ap.add_argument("--kd", type=float, default=0.0, help="output distillation weight (0: off)")
    ap.add_argument("--seconds", type=float, default=None, help="about this long per config (scales the steps)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=Path("runs/split"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from models.offline import configure_offline, patch_ultralytics

    configure_offline()
    from ultralytics import YOLO

    patch_ultralytics()
    imgsz = tuple(int(v) for v in args.imgsz.split("x"))
    images, labels = load_letterboxed(args.data, "train", imgsz, args.images)  # type: ignore[arg-type]
    for cfg in args.configs:
        parts = [int(v) for v in cfg.split(":")]
        cut, width, bits = parts[:3]
        stride = parts[3] if len(parts) > 3 else 2
        hidden = parts[4] if len(parts) > 4 else None
        model = YOLO(str(args.checkpoint), task="detect").model
        bn, info = train_bottleneck(model, images, labels, cut=cut, width=width, bits=bits, stride=stride,
                                    steps1=args.steps1, steps2=args.steps2, batch=args.batch, device=args.device,
                                    seconds=args.seconds, tune_hub=args.tune_hub, crop=args.crop, hidden=hidden,
                                    kd=args.kd)
        tag = (f"c{cut}w{width}b{bits}s{stride}" + (f"h{hidden}" if hidden else "") + ("t" if args.tune_hub else "")
               + ("k" if args.kd else ""))
        out = save_bottleneck(args.out / f"{tag}.pt", bn, info)
        log.info("%s: %.0f s, last feature mse %.4f det %.3f", out, info["seconds"], info["history"][-1]["feature_mse"],
                 info["history"][-1]["det_loss"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
