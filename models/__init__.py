"""Everything about the model artefact: synthetic data, training, export, quantization,
evaluation and the bundle format.

Importing this package (and its processing, detections, bundle, dataset_io, metrics and
evaluate modules) needs no torch: the edge agent uses them. Training and export import
torch and ultralytics lazily (the ``train`` extra).
"""

__all__: list[str] = []
