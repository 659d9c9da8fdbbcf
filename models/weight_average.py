"""Weight-space averaging of a fine-tuned detector with the model it started from (torch).

Fine-tuning on a few hundred reviewed frames moves the weights away from what kept the old
classes; interpolating linearly between the start and the fine-tuned weights,
``(1 - a) * tuned + a * start``, takes back part of that move (Wortsman et al., "Robust
fine-tuning of zero-shot models", CVPR 2022: WiSE-FT). The two models share the start's basin,
so the mix is a model of its own, not a blur of two.

A class the start model did not know (a class head widened by :mod:`models.class_head`) has no
start weights to mix with: the rows of such classes in the class convolutions are kept from
the tuned model, so a new class is not pulled back towards "never seen".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from models.checkpoint import CheckpointError, checkpoint_model, load_checkpoint, model_classes
from models.offline import configure_offline

__all__ = ["average_checkpoints"]


def average_checkpoints(start: str | Path, tuned: str | Path, start_weight: float, out: str | Path) -> Path:
    """Write ``tuned`` with every float tensor ``(1 - start_weight) * tuned + start_weight * start``.

    ``start_weight`` 0 writes the tuned model's weights, 1 the start's (for the classes it knew).
    The tuned model's classes must begin with the start's, in order (the job widens the head so);
    rows of the classes after them come from ``tuned``. :class:`CheckpointError` when the two are
    not the same network.
    """
    if not 0.0 <= start_weight <= 1.0:
        raise ValueError(f"start_weight must be in [0, 1], got {start_weight}")
    configure_offline()
    import torch

    a = float(start_weight)
    ck_s, ck_t = load_checkpoint(start), load_checkpoint(tuned)
    m_s, m_t = checkpoint_model(ck_s), checkpoint_model(ck_t)
    old, new = model_classes(m_s), model_classes(m_t)
    if new[: len(old)] != old:
        raise CheckpointError(f"the tuned model's classes {new} do not start with the start model's {old}")
    sd_s, sd_t = m_s.state_dict(), m_t.state_dict()
    if set(sd_s) != set(sd_t):
        raise CheckpointError(f"{start} and {tuned} are not the same network: "
                              f"{len(set(sd_s) ^ set(sd_t))} tensors are in one only")
    mixed: dict[str, Any] = {}
    for key, t in sd_t.items():
        s = sd_s[key]
        if not t.is_floating_point():
            mixed[key] = t  # BatchNorm's batch counters
            continue
        if s.shape == t.shape:
            mixed[key] = ((1 - a) * t.float() + a * s.float()).to(t.dtype)
        elif s.shape[1:] == t.shape[1:] and s.shape[0] == len(old) and t.shape[0] == len(new):
            m = t.float().clone()  # a widened class convolution: the old classes' rows mixed, the new ones tuned
            m[: len(old)] = (1 - a) * t[: len(old)].float() + a * s.float()
            mixed[key] = m.to(t.dtype)
        else:
            raise CheckpointError(f"{key}: shapes {tuple(s.shape)} (start) and {tuple(t.shape)} (tuned) do not mix")
    m_t.load_state_dict(mixed)
    ck_t["model"], ck_t["ema"], ck_t["optimizer"] = m_t, None, None
    ck_t["weight_average"] = {"start": str(start), "start_weight": a}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    torch.save(ck_t, str(tmp))
    tmp.replace(out)
    return out
