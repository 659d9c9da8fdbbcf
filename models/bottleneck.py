"""The learned bottleneck at the cut: a small encoder on the edge, a decoder at the hub (torch).

At a cut that one tensor crosses (YOLOv8: after layer 2, 3 or 4), the encoder maps the
``C_in x H x W`` map to ``width x H/stride x W/stride`` values in ``[0, 1]`` (sigmoid), quantized to
``bits`` bits; the decoder maps the codes back to ``C_in x H x W`` for the unchanged rest of the
network. Training (:mod:`models.split_train`) first adds uniform noise in place of rounding, as
learned compression does (Balle et al.), then rounds with a straight-through gradient, so that
the last steps see exactly the codes inference sends; inference rounds.

:class:`SplitEdge` = layers ``0..cut`` + encoder + quantizer -> ``uint8`` codes (what the agent
runs, exported to ONNX and INT8-quantized like the full model); :class:`SplitHub` = decoder +
layers ``cut+1..end`` -> the same output as the whole model's ONNX (``1 x (4+nc) x anchors``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from models.feature_codec import FeatureSpec
from models.split import EdgePart, HubPart, needed_outputs

__all__ = ["Bottleneck", "SplitEdge", "SplitHub", "build_split", "crossing_channels", "detection_model", "spec_for"]


def _conv(cin: int, cout: int, k: int = 3, s: int = 1, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, s, k // 2)]
    if act:
        layers.append(nn.SiLU())
    return nn.Sequential(*layers)


class Bottleneck(nn.Module):
    """Encoder and decoder of one cut; ``forward`` (training) returns the reconstruction."""

    def __init__(self, channels: int, width: int, bits: int, stride: int = 2, hidden: int | None = None) -> None:
        super().__init__()
        if stride not in (1, 2, 4):
            raise ValueError(f"stride must be 1, 2 or 4, got {stride}")
        hidden = hidden or channels
        self.channels, self.width, self.bits, self.stride, self.hidden = channels, width, bits, stride, hidden
        self.levels = float((1 << bits) - 1)
        self.quant_mode = "noise"  # training only: "noise" (stage 1) or "ste" (stage 2)
        enc: list[nn.Module] = [_conv(channels, hidden)]
        s = stride
        while s > 1:
            enc.append(_conv(hidden, hidden, 3, 2))
            s //= 2
        enc.append(_conv(hidden, width, 1, act=False))
        self.encoder = nn.Sequential(*enc)
        dec: list[nn.Module] = [_conv(width, hidden), _conv(hidden, hidden)]
        s = stride
        while s > 1:
            dec += [nn.Upsample(scale_factor=2, mode="nearest"), _conv(hidden, hidden)]
            s //= 2
        dec.append(_conv(hidden, channels, 3, act=False))
        self.decoder = nn.Sequential(*dec)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature map -> code values in ``[0, levels]`` (float; rounded unless training)."""
        y = torch.sigmoid(self.encoder(x)) * self.levels
        if not self.training:
            return torch.round(y)
        if self.quant_mode == "ste":  # round forward, identity backward (straight-through)
            return y + (torch.round(y) - y).detach()
        return y + (torch.rand_like(y) - 0.5)  # additive uniform noise stands in for rounding

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self.decoder(codes / self.levels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


def crossing_channels(model: Any, cut: int, imgsz: tuple[int, int]) -> tuple[int, int, int]:
    """``(C, H, W)`` of the one tensor crossing ``cut``; ValueError for cuts that more cross."""
    layers = _layers(model)
    outs = needed_outputs(layers, cut)
    if outs != [cut]:
        raise ValueError(f"cut {cut}: layers {outs} cross it; the bottleneck needs a cut that one tensor crosses "
                         f"(YOLOv8: 2, 3 or 4)")
    edge = EdgePart(layers, cut, outs)
    p = next(edge.parameters())
    with torch.no_grad():
        (t,) = edge(torch.zeros(1, 3, *imgsz, device=p.device, dtype=p.dtype))
    return int(t.shape[1]), int(t.shape[2]), int(t.shape[3])


def detection_model(model: Any) -> Any:
    """The Ultralytics ``DetectionModel`` of a ``YOLO`` wrapper or of itself."""
    inner = getattr(model, "model", None)
    if isinstance(inner, nn.Sequential):
        return model
    if inner is not None and isinstance(getattr(inner, "model", None), nn.Sequential):
        return inner
    raise TypeError(f"not an Ultralytics detector: {type(model).__name__}")


def _layers(model: Any) -> nn.ModuleList:
    return detection_model(model).model


class SplitEdge(nn.Module):
    """Image ``(N, 3, H, W)`` in ``[0, 1]`` -> codes ``(N, width, h, w)`` as uint8."""

    def __init__(self, model: Any, cut: int, bottleneck: Bottleneck) -> None:
        super().__init__()
        layers = _layers(model)
        self.edge = EdgePart(layers, cut, [cut])
        self.bottleneck = bottleneck

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (f,) = self.edge(x)
        codes = torch.round(torch.sigmoid(self.bottleneck.encoder(f)) * self.bottleneck.levels)
        return codes.to(torch.uint8)


class SplitHub(nn.Module):
    """Codes ``(N, width, h, w)`` uint8 -> the detector's output ``(N, 4 + nc, anchors)``."""

    def __init__(self, model: Any, cut: int, bottleneck: Bottleneck) -> None:
        super().__init__()
        layers = _layers(model)
        self.hub = HubPart(layers, cut, [cut])
        self.bottleneck = bottleneck

    def forward(self, codes: torch.Tensor) -> Any:
        out = self.hub(self.bottleneck.decode(codes.float()))
        return out[0] if isinstance(out, tuple) else out


def build_split(model: Any, cut: int, bottleneck: Bottleneck) -> tuple[SplitEdge, SplitHub]:
    return SplitEdge(model, cut, bottleneck), SplitHub(model, cut, bottleneck)


def spec_for(cut: int, bottleneck: Bottleneck, crossing: tuple[int, int, int]) -> FeatureSpec:
    _, h, w = crossing
    s = bottleneck.stride
    return FeatureSpec(cut=cut, channels=bottleneck.width, height=-(-h // s), width=-(-w // s), bits=bottleneck.bits)
