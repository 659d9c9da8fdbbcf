"""Split parts for a retrained model (torch): the production bottleneck, the candidate's layers.

A retraining that keeps the layers up to the cut frozen (the ``retrain`` presets freeze the
backbone) leaves the device part's features exactly as the bottleneck was trained on them, so the
candidate reuses production's bottleneck: the device part (layers 0..cut + encoder) is unchanged,
the hub part is the decoder followed by the candidate's own layers after the cut. The hub layers
the bottleneck run had fine-tuned for production are *not* carried over (they would overwrite the
retrained layers); that tuning is not redone here, and the manifest says so.
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


def rebuild_split_parts(production: Path, candidate: Path, *, calib_data: Path, work: Path) -> Manifest:
    """Give ``candidate`` (a bundle without split parts) split parts from ``production``'s
    bottleneck, in place; its version and parent stay. :class:`SplitRebuildError` when the
    candidate's layers up to the cut are not production's."""
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
    a = _state(YOLO(str(prod.path("checkpoint")), task="detect"))
    b = _state(YOLO(str(cand.path("checkpoint")), task="detect"))
    changed = layers_changed(a, b, cut)
    if changed:
        raise SplitRebuildError(
            f"{len(changed)} tensors of layers 0..{cut} changed in retraining (e.g. {changed[0]}): production's "
            f"bottleneck was trained on those layers' output; retrain with them frozen (preset 'freeze' > {cut})")
    raw = torch.load(prod.path("split_bottleneck"), map_location="cpu", weights_only=True)
    raw["hub_layers"] = None  # production's tuned hub layers would overwrite the retrained ones
    work.mkdir(parents=True, exist_ok=True)
    bottleneck = work / "split_bottleneck.pt"
    tmp = bottleneck.with_suffix(".tmp")
    torch.save(raw, tmp)
    tmp.replace(bottleneck)
    m = cand.manifest
    manifest = add_split_parts(candidate, bottleneck, calib_data, version=m.version, out=candidate, overwrite=True,
                               parent_version=m.parent_version,
                               metrics={"bottleneck_from": prod.manifest.version, "hub_tuning": "not redone"})
    log.info("split parts for %s: production %s's bottleneck at cut %d, hub part from the retrained layers",
             m.version, prod.manifest.version, cut)
    return manifest
