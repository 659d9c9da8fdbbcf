"""Split parts for a retrained model (torch): production's bottleneck, the candidate's layers.

A retraining that keeps the layers up to the cut frozen (``retrain-cpu`` freezes the backbone)
leaves the device part's features exactly as the bottleneck was trained on them, so the candidate
reuses production's bottleneck as it is: the device part (layers 0..cut + encoder) is unchanged,
the hub part is the decoder followed by the candidate's own layers after the cut.

A retraining that changed those layers (``retrain`` trains every layer: a new product's colours
are not learned with the first layers frozen, docs/learning_loop.md) gets production's bottleneck
fine-tuned to the candidate (``retune_steps`` steps of :func:`models.split_train.train_bottleneck`
from production's weights, the candidate as teacher, on the job's training frames); without
``retune_steps`` it is refused (:class:`SplitRebuildError`).

Either way, the hub layers the bottleneck run had fine-tuned for production are *not* carried
over (they would overwrite the retrained layers); that tuning is not redone, and the manifest says so.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from models.bundle import Manifest, load_bundle

__all__ = ["SplitRebuildError", "rebuild_split_parts", "layers_changed"]

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


def rebuild_split_parts(production: Path, candidate: Path, *, calib_data: Path, work: Path, retune_steps: int = 0,
                        retune_images: int = 400, device: str | None = None) -> Manifest:
    """Give ``candidate`` (a bundle without split parts) split parts from ``production``'s
    bottleneck, in place; its version and parent stay. When the candidate's layers up to the cut
    are not production's, the bottleneck is fine-tuned for ``retune_steps`` steps on up to
    ``retune_images`` frames of ``calib_data``'s train split, or (``retune_steps`` 0)
    :class:`SplitRebuildError`."""
    import torch

    from models.offline import configure_offline, patch_ultralytics

    configure_offline()
    from ultralytics import YOLO

    from models.split_bundle import add_split_parts

    patch_ultralytics()
    prod = load_bundle(production, roles=("checkpoint", "split_bottleneck"))
    cand = load_bundle(candidate, roles=("checkpoint",))
    split = prod.manifest.split or {}
    cut = int(split["cut"])
    cand_yolo = YOLO(str(cand.path("checkpoint")), task="detect")
    changed = layers_changed(_state(YOLO(str(prod.path("checkpoint")), task="detect")), _state(cand_yolo), cut)
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
        images, labels = load_letterboxed(calib_data, "train", imgsz, limit=retune_images)
        dev = _device(device)
        log.info("split parts for %s: %d tensors of layers 0..%d changed: fine-tuning %s's bottleneck, %d steps "
                 "on %d frames (%s)", cand.manifest.version, len(changed), cut, prod.manifest.version, retune_steps,
                 len(images), dev)
        bn, tinfo = train_bottleneck(cand_yolo.model, images, labels, cut=cut, width=int(info["width"]),
                                     bits=int(info["bits"]), stride=int(info["stride"]), hidden=info.get("hidden"),
                                     steps1=0, steps2=retune_steps, batch=min(16, len(images)),
                                     lr=float(info.get("lr", 2e-3)) / 2, device=dev, progress=False,
                                     kd=float(info.get("kd", 0.0)), init=prod_bn)
        save_bottleneck(bottleneck, bn, {**tinfo, "retuned_from": prod.manifest.version})
        metrics["bottleneck_retuned"] = {"steps": tinfo["steps_done"], "images": len(images),
                                         "seconds": tinfo["seconds"], "device": dev}
    else:
        raw = torch.load(prod.path("split_bottleneck"), map_location="cpu", weights_only=True)
        raw["hub_layers"] = None  # production's tuned hub layers would overwrite the retrained ones
        tmp = bottleneck.with_suffix(".tmp")
        torch.save(raw, tmp)
        tmp.replace(bottleneck)
    metrics["hub_tuning"] = "not redone"
    m = cand.manifest
    manifest = add_split_parts(candidate, bottleneck, calib_data, version=m.version, out=candidate, overwrite=True,
                               parent_version=m.parent_version, metrics=metrics)
    log.info("split parts for %s: production %s's bottleneck at cut %d%s, hub part from the retrained layers",
             m.version, prod.manifest.version, cut, " (fine-tuned)" if changed else "")
    return manifest
