"""Synthetic inspection line: the training/evaluation dataset of the default defect detector
and the recorded conveyor videos the edge agent replays.

Modules: ``background`` (belt, rails), ``parts`` (product surfaces and their features),
``defects`` (scratch, crack, dent, stain), ``sprite`` (part instances and compositing),
``camera`` (lighting, blur, noise), ``scene`` (one dataset image), ``dataset`` and ``video``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from models.synth.dataset import PRESETS, DatasetPreset, generate_dataset
    from models.synth.video import generate_video

__all__ = ["PRESETS", "DatasetPreset", "generate_dataset", "generate_video"]

_HOME = {"PRESETS": "dataset", "DatasetPreset": "dataset", "generate_dataset": "dataset", "generate_video": "video"}


def __getattr__(name: str) -> Any:
    """Lazy exports: ``models.synth.lines`` (the CLI's ``--line`` choices) loads without OpenCV."""
    if name not in _HOME:
        raise AttributeError(f"module 'models.synth' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"models.synth.{_HOME[name]}"), name)
