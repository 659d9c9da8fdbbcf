"""The float-only tail of a YOLO Detect head in an exported ONNX graph (onnx only, no torch).

INT8 quantization (:mod:`models.quantize`, and the split hub part in :mod:`models.split_export`)
keeps the Detect head's decoding in float: everything downstream of the last Conv of each Detect
branch (the DFL Reshape/Transpose/Softmax/Conv, the anchor/stride Sub/Add/Div/Mul, the class
Sigmoid and the Concats that build ``output0``). :func:`find_head_tail` finds that tail from the
graph's structure, walking back from the model output, not from hard-coded node names; the Detect
layer's index is read off the node names it reaches. A graph with no Conv upstream of its output
raises :class:`models.quantize.QuantizationError`.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

__all__ = ["HeadTail", "find_head_tail"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HeadTail:
    """The float-only tail of a YOLO Detect head."""

    detect_layer: str  # e.g. "/model.22"
    nodes: tuple[str, ...]  # node names downstream of the branch-final convs, graph order
    branch_convs: tuple[str, ...]  # the last Conv of each Detect branch (boundary, quantized)


_LAYER_RE = re.compile(r"^(/model\.\d+)/")


def find_head_tail(model: Any) -> HeadTail:
    """Find the Detect head's decode tail by structure.

    Walks back from every graph output. Every node reached is part of the tail, except that a
    ``Conv`` is a boundary (a branch-final conv) unless its input comes from a ``Softmax`` (the
    DFL's fixed ``arange`` conv, which belongs to the tail). ``model`` is an ``onnx.ModelProto``
    or a path.
    """
    import onnx

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    g = model.graph
    producer = {out: n for n in g.node for out in n.output}
    tail: set[str] = set()
    boundary: set[str] = set()
    stack = [producer[o.name] for o in g.output if o.name in producer]
    while stack:
        node = stack.pop()
        if node.name in tail or node.name in boundary:
            continue
        if node.op_type == "Conv":
            src = producer.get(node.input[0])
            if src is None or src.op_type != "Softmax":
                boundary.add(node.name)
                continue
        tail.add(node.name)
        stack.extend(producer[i] for i in node.input if i in producer)
    if not boundary:
        from models.quantize import QuantizationError  # here, not at the top: models.quantize imports this module

        raise QuantizationError("no Conv found upstream of the model output: not a YOLO Detect graph?")
    if not any(producer_n.op_type == "Softmax" for producer_n in g.node if producer_n.name in tail):
        log.warning("no DFL Softmax found in the head tail; is this a YOLO Detect (DFL) head?")
    out_node = producer[g.output[0].name]
    m = _LAYER_RE.match(out_node.name)
    detect_layer = m.group(1) if m else ""
    if detect_layer:
        strays = sorted(n for n in tail if not n.startswith(detect_layer + "/"))
        if strays:
            log.warning("head tail reaches outside %s: %s", detect_layer, strays)
    order = [n.name for n in g.node]
    return HeadTail(
        detect_layer=detect_layer,
        nodes=tuple(n for n in order if n in tail),
        branch_convs=tuple(n for n in order if n in boundary),
    )
