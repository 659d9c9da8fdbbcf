"""Cutting an Ultralytics detector into an edge part and a hub part (issue 5, first step).

``DetectionModel`` walks ``model.model`` in order; a layer whose ``f`` is not -1 reads earlier
outputs, which are kept only for the indices in ``model.save``. Cutting after layer ``cut``
means the hub part needs every output of a layer ``<= cut`` that a layer ``> cut`` reads:
:func:`needed_outputs`. For YOLOv8 cut after SPPF (layer 9) that is layers 4, 6 and 9; cut after
layer 4, only layer 4.

:func:`split_model` returns two ``torch.nn.Module`` s sharing the original layers (no copy):
``EdgePart(x) -> tuple of tensors`` (in :func:`needed_outputs` order) and
``HubPart(*tensors) -> the Detect output``. Run in eval mode, ``hub(*edge(x))`` equals
``model(x)``. This module needs torch (the ``train`` extra); agents use the exported ONNX parts.

The learned bottleneck (encoder at the cut, decoder at the hub) builds on these parts.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["EdgePart", "HubPart", "needed_outputs", "raw_feature_bytes", "split_model"]


def _sources(layer: Any, index: int) -> list[int]:
    f = layer.f if isinstance(layer.f, list) else [layer.f]
    return [index - 1 if j == -1 else j for j in f]


def needed_outputs(layers: nn.ModuleList | list[Any], cut: int) -> list[int]:
    """Indices ``<= cut`` whose outputs some layer after ``cut`` reads, ascending."""
    if not 0 <= cut < len(layers) - 1:
        raise ValueError(f"cut {cut}: must leave at least one layer on each side (0..{len(layers) - 2})")
    need = {j for i in range(cut + 1, len(layers)) for j in _sources(layers[i], i) if j <= cut}
    return sorted(need)


class EdgePart(nn.Module):
    """Layers ``0..cut``; returns the outputs the hub part needs."""

    def __init__(self, layers: nn.ModuleList, cut: int, outputs: list[int]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers[: cut + 1])
        self.outputs = outputs

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y: dict[int, torch.Tensor] = {}
        for i, m in enumerate(self.layers):
            src = _sources(m, i)
            inp = y[src[0]] if len(src) == 1 and i > 0 else x if i == 0 else [y[j] for j in src]
            x = m(inp)
            y[i] = x
        return tuple(y[i] for i in self.outputs)


class HubPart(nn.Module):
    """Layers ``cut+1..end``, fed with the edge part's outputs."""

    def __init__(self, layers: nn.ModuleList, cut: int, inputs: list[int]) -> None:
        super().__init__()
        self.first = cut + 1
        self.layers = nn.ModuleList(layers[cut + 1:])
        self.inputs = inputs

    def forward(self, *features: torch.Tensor) -> Any:
        if len(features) != len(self.inputs):
            raise ValueError(f"expected {len(self.inputs)} feature tensors (layers {self.inputs}), got {len(features)}")
        y: dict[int, Any] = dict(zip(self.inputs, features, strict=True))
        out: Any = None
        for k, m in enumerate(self.layers):
            i = self.first + k
            src = _sources(m, i)
            out = m(y[src[0]] if len(src) == 1 else [y[j] for j in src])
            y[i] = out
        return out


def split_model(model: Any, cut: int) -> tuple[EdgePart, HubPart, list[int]]:
    """``(edge, hub, outputs)`` for an Ultralytics ``DetectionModel`` (or a ``YOLO`` wrapper)."""
    inner = getattr(model, "model", model)
    layers = inner.model if hasattr(inner, "model") else inner
    outputs = needed_outputs(layers, cut)
    return EdgePart(layers, cut, outputs), HubPart(layers, cut, outputs), outputs


def raw_feature_bytes(features: tuple[torch.Tensor, ...], bits: int = 8) -> int:
    """Bytes per frame of the features sent as they are, at ``bits`` per value (batch 1)."""
    values = sum(int(t[0].numel()) for t in features)
    return values * bits // 8
