"""Split parts for a retrained model (torch): production's bottleneck, the candidate's layers.

A retraining that keeps the layers up to the cut frozen (``retrain-cpu`` freezes layers 0-4)
leaves the device part's features exactly as the bottleneck was trained on them, so the candidate
reuses production's bottleneck as it is: the device part (layers 0..cut + encoder) is unchanged,
the hub part is the decoder followed by the candidate's own layers after the cut.

A retraining that changed those layers (``retrain`` trains every layer: a new product's colours
are not learned with the first layers frozen, docs/learning_loop.md) gets production's bottleneck
fine-tuned to the candidate (``retune_steps`` steps of :func:`models.split_train.train_bottleneck`
from production's weights, the candidate as teacher, on the job's training frames); without
``retune_steps`` it is refused (:class:`SplitRebuildError`).

The hub layers the bottleneck run had fine-tuned for production are never carried over as they
are (they would overwrite the retrained layers); what that tuning changed in production's layers
is added to the candidate's (:func:`transferred_hub_tuning`, no training). A reused bottleneck gets
the candidate's hub layers so; a fine-tuned one has them tuned with it, as production's were (its
``tune_hub``), starting from there. The manifest's ``split.metrics.hub_tuning`` says which, and the
gate scores the split parts either way.
"""

from __future__ import annotations

import contextlib
import logging
from multiprocessing import get_context
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from models.bundle import Bundle, Manifest, load_bundle

__all__ = ["BottleneckPrep", "SplitRebuildError", "layers_changed", "prepare_bottleneck", "prepared_bottleneck",
           "production_bottleneck", "rebuild_split_parts", "start_prepare_bottleneck", "transferred_hub_tuning"]

log = logging.getLogger(__name__)


class SplitRebuildError(RuntimeError):
    """The candidate cannot reuse production's bottleneck (its device layers changed)."""


def layers_changed(a: dict[str, Any], b: dict[str, Any], last: int, rtol: float = 1e-3) -> list[str]:
    """Tensors of layers ``0..last`` (``model.<i>.``) that differ between two state dicts beyond
    ``rtol`` of their largest magnitude (the EMA rounds unchanged weights by an ulp or so)."""
    out = []
    for k, va in a.items():
        parts = k.split(".")
        if len(parts) < 2 or parts[0] != "model" or not parts[1].isdigit() or int(parts[1]) > last:
            continue
        vb = b.get(k)
        if vb is None or vb.shape != va.shape:
            out.append(k)
            continue
        if not va.is_floating_point():
            if not bool((va == vb).all()):
                out.append(k)
            continue
        fa, fb = va.float(), vb.float()
        if float((fa - fb).abs().max()) > rtol * max(float(fa.abs().max()), 1e-6):
            out.append(k)
    return out


def _state(yolo: Any) -> dict[str, Any]:
    return dict(yolo.model.state_dict())


def _device(device: str | None) -> str:
    import torch

    if device in (None, ""):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return f"cuda:{device}" if str(device).isdigit() else str(device)


def prepare_bottleneck(production: Path, candidate_checkpoint: Path, *, calib_data: Path, work: Path,
                       retune_steps: int = 0, retune_images: int = 400, device: str | None = None,
                       frames: tuple[Any, list[Any]] | None = None) -> dict[str, Any]:
    """The candidate's bottleneck in ``work/split_bottleneck.pt``: production's, as it is when the
    candidate's layers up to the cut are production's, else fine-tuned for ``retune_steps`` steps on
    up to ``retune_images`` frames of ``calib_data``'s train split (``retune_steps`` 0:
    :class:`SplitRebuildError`). ``work/bottleneck.json`` (written last) holds the metrics and the
    checkpoint's SHA-256, so that :func:`rebuild_split_parts` reuses a bottleneck prepared earlier
    (the retraining job prepares it on the GPU while the CPU builds the release) for that checkpoint
    only. ``frames``: :func:`models.split_train.load_letterboxed`'s result, when the caller loaded them."""
    import torch

    from models.bundle import sha256_file
    from models.fsutil import atomic_write_json
    from models.offline import configure_offline, patch_ultralytics

    configure_offline()
    from ultralytics import YOLO

    patch_ultralytics()
    prod = load_bundle(production, roles=("checkpoint", "split_bottleneck"))
    cut = int((prod.manifest.split or {})["cut"])
    cand_yolo = YOLO(str(candidate_checkpoint), task="detect")
    prod_yolo = YOLO(str(prod.path("checkpoint")), task="detect")
    changed = layers_changed(_state(prod_yolo), _state(cand_yolo), cut)
    metrics: dict[str, Any] = {"bottleneck_from": prod.manifest.version}
    work.mkdir(parents=True, exist_ok=True)
    bottleneck = work / "split_bottleneck.pt"
    if changed and retune_steps <= 0:
        raise SplitRebuildError(
            f"{len(changed)} tensors of layers 0..{cut} changed in retraining (e.g. {changed[0]}): production's "
            f"bottleneck was trained on those layers' output; retrain with them frozen (preset 'freeze' > {cut}) "
            f"or fine-tune the bottleneck (retune_steps > 0)")
    if changed:
        from models.split_train import load_bottleneck, load_letterboxed, save_bottleneck, train_bottleneck

        prod_bn, info = load_bottleneck(prod.path("split_bottleneck"))
        imgsz = (int(info["imgsz"][0]), int(info["imgsz"][1]))
        images, labels = frames or load_letterboxed(calib_data, "train", imgsz, limit=retune_images)
        dev = _device(device)
        tune_hub = float(info.get("tune_hub", 0.0))
        hub_init = (transferred_hub_tuning(prod_yolo.model, cand_yolo.model, info["hub_tuned"], cut)
                    if tune_hub > 0 and info.get("hub_tuned") is not None else None)
        log.info("split bottleneck: %d tensors of layers 0..%d changed: fine-tuning %s's bottleneck, %d steps "
                 "on %d frames (%s)", len(changed), cut, prod.manifest.version, retune_steps, len(images), dev)
        bn, tinfo = train_bottleneck(cand_yolo.model, images, labels, cut=cut, width=int(info["width"]),
                                     bits=int(info["bits"]), stride=int(info["stride"]), hidden=info.get("hidden"),
                                     steps1=0, steps2=retune_steps, batch=min(16, len(images)),
                                     lr=float(info.get("lr", 2e-3)) / 2, device=dev, progress=False,
                                     kd=float(info.get("kd", 0.0)), init=prod_bn, tune_hub=tune_hub,
                                     hub_init=hub_init)
        save_bottleneck(bottleneck, bn, {**tinfo, "retuned_from": prod.manifest.version})
        metrics["bottleneck_retuned"] = {"steps": tinfo["steps_done"], "images": len(images),
                                         "seconds": tinfo["seconds"], "device": dev}
        start = "the retrained layers plus production's tuning" if hub_init is not None else "the retrained layers"
        metrics["hub_tuning"] = (f"redone with the bottleneck (lr x {tune_hub:g}), from {start}" if tune_hub > 0
                                 else "not redone")
    else:
        raw = torch.load(prod.path("split_bottleneck"), map_location="cpu", weights_only=True)
        tuned = raw.get("hub_layers")  # production's own would overwrite the retrained layers: never as they are
        if tuned is None:
            metrics["hub_tuning"] = "not redone"
        else:
            moved = transferred_hub_tuning(prod_yolo.model, cand_yolo.model, tuned, cut)
            raw["hub_layers"] = {k: v.half() if v.is_floating_point() else v for k, v in moved.items()}
            metrics["hub_tuning"] = "production's tuning added to the retrained layers"
        tmp = bottleneck.with_suffix(".tmp")
        torch.save(raw, tmp)
        tmp.replace(bottleneck)
    atomic_write_json(work / "bottleneck.json", {"checkpoint_sha256": sha256_file(candidate_checkpoint),
                                                 "cut": cut, "layers_changed": len(changed), "metrics": metrics})
    return metrics


def _hub_state(model: Any, cut: int) -> dict[str, Any]:
    from models.bottleneck import detection_model
    from models.split import HubPart

    return dict(HubPart(detection_model(model).model, cut, [cut]).layers.state_dict())


def transferred_hub_tuning(prod_model: Any, cand_model: Any, tuned: dict[str, Any], cut: int) -> dict[str, Any]:
    """The candidate's hub layers (after ``cut``) plus what production's tuning with its bottleneck
    changed in production's (``tuned`` minus production's layers as trained), tensor by tensor where
    the shapes agree (a head grown for a new class keeps its own rows). For a retraining that kept
    the layers up to the cut (``retrain-cpu``), whose hub layers were retrained without the
    bottleneck: the split parts' golden mAP50 went from 0.9462 (layers as trained) to 0.9501, where
    300 steps of tuning behind the fixed bottleneck on the job's crops reached 0.9499 in 111 s on the
    2-core CPU (porosity candidate, 2026-11-24)."""
    own, before = _hub_state(cand_model, cut), _hub_state(prod_model, cut)
    out = {}
    for k, v in own.items():
        t, b = tuned.get(k), before.get(k)
        if t is not None and b is not None and t.shape == b.shape == v.shape and v.is_floating_point():
            out[k] = v.float() + (t.float() - b.float())
        else:
            out[k] = v.clone()
    return out


def prepared_bottleneck(work: Path, candidate_checkpoint: Path) -> dict[str, Any] | None:
    """The metrics of a bottleneck :func:`prepare_bottleneck` left in ``work`` for this checkpoint, or None."""
    import json

    from models.bundle import sha256_file

    doc_path, bn = work / "bottleneck.json", work / "split_bottleneck.pt"
    if not (doc_path.is_file() and bn.is_file()):
        return None
    try:
        doc = json.loads(doc_path.read_text())
    except ValueError:
        return None
    if doc.get("checkpoint_sha256") != sha256_file(candidate_checkpoint):
        return None
    return dict(doc["metrics"])


def production_bottleneck(prod: Bundle) -> Path | None:
    """The split bottleneck file of a split bundle, when it is there (a hub may hold a split
    production without it); None for an unsplit bundle or a missing file."""
    entry = prod.manifest.files.get("split_bottleneck")
    if not prod.manifest.split or entry is None or not (prod.dir / entry.path).is_file():
        return None
    return prod.dir / entry.path


class BottleneckPrep:
    """:func:`prepare_bottleneck` in a spawned process (its own CUDA context, nothing shared with the
    caller's torch), started before the candidate's checkpoint exists: the process imports torch,
    loads production's bottleneck and the frames and warms the GPU up (a few fine-tuning steps of
    production itself: the first steps of a fresh process cost about 9 s more on an H100) while
    the caller trains; :meth:`submit` hands it the checkpoint. A process whose caller goes away
    before that (the pipe closes) exits without work."""

    def __init__(self, proc: BaseProcess, conn: Connection) -> None:
        self.proc, self._conn = proc, conn

    @property
    def exitcode(self) -> int | None:
        return self.proc.exitcode

    def submit(self, candidate_checkpoint: Path) -> bool:
        """Hand the process the checkpoint; False (logged) when it is gone: the caller's split step
        then does the work itself (:func:`rebuild_split_parts` finds nothing prepared)."""
        try:
            self._conn.send(str(candidate_checkpoint))
        except OSError as e:
            log.warning("split bottleneck: process %s is gone (%s, exit code %s): the split step will prepare "
                        "the bottleneck itself", self.proc.pid, e, self.proc.exitcode)
            return False
        return True

    def cancel(self) -> None:
        """No checkpoint is coming (training failed): the process exits."""
        with contextlib.suppress(OSError):  # the process may be gone already
            self._conn.send(None)
        self.join(30)
        if self.proc.is_alive():
            self.proc.terminate()
            self.join(10)

    def join(self, timeout: float | None = None) -> None:
        self.proc.join(timeout)


def _prepare_in_child(production: Path, conn: Connection, *, calib_data: Path, retune_images: int = 400,
                      device: str | None = None, **kw: Any) -> None:
    """The child's work is on the GPU: two CPU threads for torch and OpenCV leave the cores to the
    training and the release's INT8 calibration and scoring running beside it (with torch's default
    of one thread per core the release took 50-64 s instead of 32 on a 16-core H100 host, 2026-11-24)."""
    import cv2
    import torch

    torch.set_num_threads(2)
    cv2.setNumThreads(2)
    frames = _preload(production, calib_data, retune_images, device)
    try:
        msg = conn.recv()
    except EOFError:
        return  # the caller went away
    if msg is None:
        return
    prepare_bottleneck(production, Path(msg), calib_data=calib_data, retune_images=retune_images, device=device,
                       frames=frames, **kw)


def _preload(production: Path, calib_data: Path, retune_images: int, device: str | None) -> tuple[Any, list[Any]]:
    """Production's frames for the fine-tuning, and the GPU warmed up with 2 steps on production's model."""
    import time

    from models.offline import configure_offline, patch_ultralytics

    configure_offline()
    from ultralytics import YOLO

    from models.split_train import load_bottleneck, load_letterboxed, train_bottleneck

    patch_ultralytics()
    t0 = time.perf_counter()
    prod = load_bundle(production, roles=("checkpoint", "split_bottleneck"))
    bn, info = load_bottleneck(prod.path("split_bottleneck"))
    imgsz = (int(info["imgsz"][0]), int(info["imgsz"][1]))
    images, labels = load_letterboxed(calib_data, "train", imgsz, limit=retune_images)
    dev = _device(device)
    if dev.startswith("cuda"):
        n = min(16, len(images))
        model = YOLO(str(prod.path("checkpoint")), task="detect").model
        nc = len(prod.manifest.classes)  # a class reviewers added is not in production's head
        known = [lab[lab[:, 0] < nc] for lab in labels[:n]]
        train_bottleneck(model, images[:n], known,
                         cut=int(info["cut"]), width=int(info["width"]), bits=int(info["bits"]),
                         stride=int(info["stride"]), hidden=info.get("hidden"), steps1=0, steps2=2, batch=n,
                         device=dev, progress=False, kd=float(info.get("kd", 0.0)), init=bn,
                         tune_hub=float(info.get("tune_hub", 0.0)))
    log.info("split bottleneck: %d frames loaded%s in %.1f s, waiting for the checkpoint", len(images),
             ", GPU warmed up" if dev.startswith("cuda") else "", time.perf_counter() - t0)
    return images, labels


def start_prepare_bottleneck(production: Path, candidate_checkpoint: Path | None = None,
                             **kw: Any) -> BottleneckPrep | None:
    """A :class:`BottleneckPrep` started (and given ``candidate_checkpoint`` when it is already
    there); None when ``production`` has no split parts or its bottleneck file is not there (there
    is nothing to prepare)."""
    if production_bottleneck(load_bundle(production, roles=())) is None:
        return None
    ctx = get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_prepare_in_child, name="split-bottleneck", args=(production, child), kwargs=kw)
    proc.start()
    child.close()
    prep = BottleneckPrep(proc, parent)
    if candidate_checkpoint is not None:
        prep.submit(candidate_checkpoint)
    log.info("split bottleneck: prepared in process %s beside the caller", proc.pid)
    return prep


def rebuild_split_parts(production: Path, candidate: Path, *, calib_data: Path, work: Path, retune_steps: int = 0,
                        retune_images: int = 400, device: str | None = None,
                        checkpoint: Path | None = None) -> Manifest:
    """Give ``candidate`` (a bundle without split parts) split parts from ``production``'s
    bottleneck (:func:`prepare_bottleneck`, unless one was prepared in ``work`` for ``checkpoint``:
    the training's file the candidate was released from; default the bundle's own copy), in place;
    its version and parent stay."""
    from models.split_bundle import add_split_parts

    cand = load_bundle(candidate, roles=("checkpoint",))
    ckpt = checkpoint or cand.path("checkpoint")
    metrics = prepared_bottleneck(work, ckpt)
    if metrics is None:
        metrics = prepare_bottleneck(production, ckpt, calib_data=calib_data, work=work,
                                     retune_steps=retune_steps, retune_images=retune_images, device=device)
    else:
        log.info("split parts for %s: the bottleneck prepared in %s", cand.manifest.version, work)
    m = cand.manifest
    manifest = add_split_parts(candidate, work / "split_bottleneck.pt", calib_data, version=m.version, out=candidate,
                               overwrite=True, parent_version=m.parent_version, metrics=metrics)
    log.info("split parts for %s: production's bottleneck at cut %s%s, hub part from the retrained layers",
             m.version, (manifest.split or {}).get("cut"), " (fine-tuned)" if "bottleneck_retuned" in metrics else "")
    return manifest
