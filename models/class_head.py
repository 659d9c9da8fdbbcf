"""Adding defect classes to a trained detector without forgetting the ones it has (torch).

Ultralytics, asked to train a 4-class checkpoint on 5-class data, builds a 5-class model and
copies over only the tensors whose shapes match: the last 1x1 convolution of every class branch
(``Detect.cv3[i][-1]``, ``nc`` output channels) does not, so the old classes' final classifier
is thrown away and must be relearned from the replay buffer. :func:`widen_class_head` instead
writes a checkpoint whose class convolutions already have the new rows: the old classes' weights
copied unchanged, the new class at the prior bias Ultralytics gives every class (zero weights:
the same low score everywhere, so no random detections), so training starts from a model that
still detects the old classes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

__all__ = ["widen_class_head"]


def widen_class_head(src: Path, names: Sequence[str], dst: Path) -> Path:
    """Write ``src`` (an Ultralytics detection checkpoint) with classes ``names`` to ``dst``.

    ``names`` must start with the checkpoint's classes in order; ValueError otherwise. With no
    new class, ``dst`` is a copy of the model as it is.
    """
    import torch
    from torch import nn

    from models.offline import configure_offline, patch_ultralytics

    configure_offline()
    from ultralytics import YOLO

    patch_ultralytics()
    yolo = YOLO(str(src), task="detect")
    model = yolo.model
    assert isinstance(model, nn.Module)
    old = [str(model.names[i]) for i in range(len(model.names))]
    names = [str(n) for n in names]
    if names[: len(old)] != old:
        raise ValueError(f"new classes {names} must start with the model's classes {old}, in order")
    det = model.model[-1]
    nc = len(names)
    heads = [det.cv3] + ([det.one2one_cv3] if getattr(det, "one2one_cv3", None) is not None else [])
    for branches in heads:
        for i, seq in enumerate(branches):
            conv = seq[-1]
            if conv.out_channels == nc:
                continue
            new = nn.Conv2d(conv.in_channels, nc, 1, bias=True).to(conv.weight.dtype)
            with torch.no_grad():
                new.weight[: len(old)] = conv.weight
                new.weight[len(old):] = 0.0  # the new class starts at its prior everywhere (no random hits)
                new.bias[: len(old)] = conv.bias
                new.bias[len(old):] = math.log(5 / nc / (640 / float(det.stride[i])) ** 2)
            seq[-1] = new
    det.nc = nc
    det.no = nc + det.reg_max * 4
    model.nc = nc
    model.names = dict(enumerate(names))
    if isinstance(getattr(model, "yaml", None), dict):
        model.yaml["nc"] = nc
    dst.parent.mkdir(parents=True, exist_ok=True)
    yolo.save(str(dst))
    return dst
