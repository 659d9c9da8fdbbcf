"""Training anchored to the starting weights (L2-SP, decoupled as AdamW decouples weight decay).

An incremental retraining starts from the production model. After each optimizer step every
trainable parameter is pulled back toward its starting value::

    w <- w - lr * strength * (w - w0)

so the model may move as far as the new data needs, at a cost, instead of drifting as far as the
learning rate lets it (forgetting what the replay buffer does not fully cover). Rows of a class the
start did not know (a widened class head) are not anchored: their start is a fresh init.
The pull scales with the learning rate (it weakens as the schedule decays), as weight decay does.

torch is imported by the caller (the ``train`` extra); this module only touches tensors it is given.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

__all__ = ["WeightAnchor"]

log = logging.getLogger(__name__)

#: YOLOv8's class logits: the last conv of each scale's class branch (``model.22.cv3.<scale>.2``)
_CLASS_ROWS = re.compile(r"\.cv3\.\d+\.2\.(weight|bias)$")


class WeightAnchor:
    """Attached to an Ultralytics model before ``train``; ``pulls`` counts the optimizer steps
    followed by a pull."""

    def __init__(self, strength: float, start: Path, known_classes: int | None = None) -> None:
        """``start``: the checkpoint training began from (a resumed training keeps its anchor);
        ``known_classes``: classes the start's head was trained on (rows past them are free)."""
        if strength < 0:
            raise ValueError(f"anchor strength must be >= 0, got {strength}")
        self.strength = strength
        self.start = Path(start)
        self.known_classes = known_classes
        self._start: dict[str, Any] = {}
        self.pulls = 0

    def attach(self, model: Any) -> None:
        model.add_callback("on_train_start", self.on_train_start)
        model.add_callback("on_train_end", self.on_train_end)

    def on_train_start(self, trainer: Any) -> None:
        """Record the start and pull after each of the trainer's optimizer steps (it accumulates
        gradients over several batches, then steps and updates its EMA)."""
        import torch

        ckpt = torch.load(self.start, map_location="cpu", weights_only=False)
        state = (ckpt.get("ema") or ckpt["model"]).float().state_dict()
        params = dict(trainer.model.named_parameters())
        self._start = {name: state[name].to(p.device) for name, p in params.items()
                       if p.requires_grad and name in state and state[name].shape == p.shape}
        step = trainer.optimizer_step

        def anchored_step() -> None:
            step()
            self.pull(trainer.model, trainer.optimizer.param_groups)

        trainer.optimizer_step = anchored_step
        log.info("training anchored to %s: strength %g on %d of %d tensors", self.start.name, self.strength,
                 len(self._start), len(params))

    def on_train_end(self, trainer: Any) -> None:
        log.info("training anchored: %d pulls", self.pulls)

    def pull(self, model: Any, param_groups: list[dict[str, Any]]) -> None:
        """One pull, each parameter at its optimizer group's learning rate (in warm-up the biases'
        rate starts high and the weights' at zero, as Ultralytics schedules them)."""
        import torch

        names = {id(p): name for name, p in model.named_parameters()}
        with torch.no_grad():
            for group in param_groups:
                rate = min(float(group["lr"]) * self.strength, 1.0)
                for p in group["params"]:
                    name = names.get(id(p), "")
                    start = self._start.get(name)
                    if start is None or rate <= 0:
                        continue
                    delta = (p - start) * rate
                    if self.known_classes is not None and _CLASS_ROWS.search(name):
                        delta[self.known_classes:] = 0  # a class the start did not know: its rows are free
                    p.sub_(delta)
        self.pulls += 1
