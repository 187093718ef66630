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
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from qcompile.graph_io import constant_values, redirect_consumers
from qcompile.pass_manager import GraphProperty, Pass, PassContext, PassResult
from qcompile.quant import TensorRange
from qcompile.rewrite import Edit, GraphView, NoMatch, Pattern, Rule, apply, find, producer, require

BLOCKED = -1e4  # mask values at or below this block a position (finfo.min, diffusers' -10000.0)
GAP = 16.0  # blocked logits sit at least this far below the smallest unblocked one


@dataclass(frozen=True)
class MaskedSum:
    add: gs.Node  # Add(scores, mask) read by the Softmax
    scores: gs.Tensor
    mask: gs.Tensor  # a constant with blocking values

    @property
    def nodes(self) -> tuple[gs.Node, ...]:
        return (self.add,)


class MaskedSoftmaxPattern(Pattern[MaskedSum]):
    """Softmax(Add(scores, mask)) with a constant mask that blocks positions."""

    name = "masked-softmax"
    anchors = frozenset({"Softmax"})

    def match(self, anchor: gs.Node, view: GraphView) -> MaskedSum:
        add = producer(anchor.inputs[0])
        require(add is not None and add.op == "Add" and len(add.inputs) == 2, "the Softmax does not read an Add")
        for scores, mask in (add.inputs, add.inputs[::-1]):
            values = constant_values(mask)
            if values is not None and constant_values(scores) is None and values.size and values.min() <= BLOCKED:
                return MaskedSum(add, scores, mask)
        raise NoMatch("the Softmax's Add has no constant blocking mask")


def masked_softmax_sums(graph: gs.Graph) -> list[tuple[gs.Node, gs.Tensor, gs.Tensor]]:
    """(Add node, scores, mask constant) for every Softmax(Add(scores, mask)) with a blocking mask."""
    return [(m.add, m.scores, m.mask) for m in find(graph, MaskedSoftmaxPattern()).matches]


class BoundMaskRule(MaskedSoftmaxPattern, Rule[MaskedSum]):
    name = "bound-attention-mask"

    def __init__(self, ranges: Mapping[str, TensorRange]):
        self.ranges = ranges

    def check(self, match: MaskedSum, view: GraphView) -> str | None:
        if match.scores.name not in self.ranges:
            return "the scores have no calibrated range to bound by"
        if match.add.outputs[0].name in view.outputs:
            return "the masked sum is a graph output (which keeps its name)"
        return None

    def floor(self, match: MaskedSum) -> float:
        """The value blocked positions get: GAP below the smallest score the mask lets through."""
        values = constant_values(match.mask)
        kept = values[values > BLOCKED]  # a bias beside the blocks (ALiBi, say) keeps its values
        rng = self.ranges[match.scores.name]
        return (min(float(kept.min()), 0.0) if kept.size else 0.0) - ((rng.hi - rng.lo) + GAP)

    def rewrite(self, match: MaskedSum, edit: Edit) -> None:
        add, values = match.add, constant_values(match.mask)
        bounded = np.where(values <= BLOCKED, self.floor(match), values).astype(values.dtype)
        add.inputs[add.inputs.index(match.mask)] = gs.Constant(f"{add.name}_bounded_mask", bounded)
        total = add.outputs[0]
        renamed = gs.Variable(f"{total.name}_bounded", dtype=total.dtype, shape=total.shape)
        redirect_consumers(total, renamed)
        add.outputs[0] = renamed


class BoundAttentionMask(Pass):
    name = "bound-attention-mask"
    preserves = frozenset({GraphProperty.NODES_NAMED, GraphProperty.SHAPES_KNOWN})

    def __init__(self, ranges: Mapping[str, TensorRange]):
        self.ranges = ranges

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        rule = BoundMaskRule(self.ranges)
        report = apply(graph, [rule])
        bounded = ", ".join(f"{m.add.name} (mask floor {rule.floor(m):.1f})" for m in report.matches)
        return PassResult(modified=bool(report.matches), detail=report.detail(bounded or "no blocking masks"))
