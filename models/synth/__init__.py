"""Synthetic inspection line: the training/evaluation dataset of the default defect detector
and the recorded conveyor videos the edge agent replays.

Modules: ``background`` (belt, rails), ``parts`` (product surfaces and their features),
``defects`` (scratch, crack, dent, stain), ``sprite`` (part instances and compositing),
``camera`` (lighting, blur, noise), ``scene`` (one dataset image), ``dataset`` and ``video``.
"""

from models.synth.dataset import PRESETS, DatasetPreset, generate_dataset
from models.synth.video import generate_video

__all__ = ["PRESETS", "DatasetPreset", "generate_dataset", "generate_video"]
