"""Bound the additive attention mask of an integer-only graph: Softmax(scores + mask) whose constant
mask blocks positions with "minus infinity" (torch.finfo(float32).min, or diffusers' -10000).

Why: an integer-only graph quantizes the sum. Calibrated over [-3.4e38, max] its step is about 1e34,
so every unblocked score lands on one level and the softmax returns uniform weights. On tiny CLIP's
causal mask this was the whole error of the text encoder at W8A16 (15.5 dB eps SQNR; the sum was
the first tensor to fall, from 40 dB to nothing).

A finite mask works as well as an infinite one: a blocked logit only has to sit far enough below
every unblocked one that exp() of the gap vanishes. With the scores inside their calibrated range
[lo, hi] and the mask's other values at least b (0 for a pure mask), a blocked value of
b - (hi - lo) - GAP puts every blocked logit at least GAP below the smallest unblocked one, so each
weighs at most exp(-GAP) of it (1e-7 at GAP 16; 77 blocked tokens 1e-5, below a 16-bit softmax's
resolution). Only the blocking values change. A row blocked entirely, whose softmax is NaN in float
(exporters' NaN guards then write zeros), becomes the softmax of its scores: such a row's output is
meaningless either way.

Each rewritten sum gets a new name: the calibrated statistics under the old name saw -3.4e38. The
integer Q/DQ pass derives its range from the scores' range and the bounded mask (an Add of a constant).
Layers that share one mask constant get one bounded copy each, since their score ranges differ.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx_graphsurgeon as gs

from qcompile.graph_io import constant_values, redirect_consumers
from qcompile.pass_manager import GraphProperty, Pass, PassContext, PassResult
from qcompile.quant import TensorRange

BLOCKED = -1e4  # mask values at or below this block a position (finfo.min, diffusers' -10000.0)
GAP = 16.0  # blocked logits sit at least this far below the smallest unblocked one


def masked_softmax_sums(graph: gs.Graph) -> list[tuple[gs.Node, gs.Tensor, gs.Constant]]:
    """(Add node, scores, mask constant) for every Softmax(Add(scores, mask)) with a blocking mask."""
    out = []
    for node in graph.nodes:
        if node.op != "Softmax" or not node.inputs[0].inputs:
            continue
        add = node.inputs[0].inputs[0]
        if add.op != "Add" or len(add.inputs) != 2:
            continue
        for scores, mask in (add.inputs, add.inputs[::-1]):
            values = constant_values(mask)
            if values is not None and constant_values(scores) is None and values.size and values.min() <= BLOCKED:
                out.append((add, scores, mask))
                break
    return out


class BoundAttentionMask(Pass):
    name = "bound-attention-mask"
    preserves = frozenset({GraphProperty.NODES_NAMED, GraphProperty.SHAPES_KNOWN})

    def __init__(self, ranges: Mapping[str, TensorRange]):
        self.ranges = ranges

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        outputs = {t.name for t in graph.outputs}
        bounded = []
        for add, scores, mask in masked_softmax_sums(graph):
            rng = self.ranges.get(scores.name)
            total = add.outputs[0]
            if rng is None or total.name in outputs:
                continue  # without the scores' range there is nothing to bound by; outputs keep names
            values = constant_values(mask)
            kept = values[values > BLOCKED]  # a bias beside the blocks (ALiBi, say) keeps its values
            floor = min(float(kept.min()), 0.0) if kept.size else 0.0
            floor -= (rng.hi - rng.lo) + GAP
            new_mask = gs.Constant(f"{add.name}_bounded_mask",
                                   np.where(values <= BLOCKED, floor, values).astype(values.dtype))
            add.inputs[add.inputs.index(mask)] = new_mask
            renamed = gs.Variable(f"{total.name}_bounded", dtype=total.dtype, shape=total.shape)
            redirect_consumers(total, renamed)
            add.outputs[0] = renamed
            bounded.append(f"{add.name} (mask floor {floor:.1f})")
        if bounded:
            graph.cleanup().toposort()
        return PassResult(modified=bool(bounded), detail=", ".join(bounded) or "no blocking masks")
