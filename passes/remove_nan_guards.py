"""Remove `Where(IsNaN(x), c, x)` guards: x itself, for integer-only targets.

Exporters of scaled-dot-product attention write a guard after the softmax so that a row masked
entirely (all -inf, softmax NaN) becomes zeros instead. In an integer-only graph no tensor can be NaN
(a quantized softmax output is a number on its grid), so the guard computes nothing, yet it costs a
boolean tensor and a Where that QNN's HTP refuses at 16 bits (tiny CLIP text encoder: finalize fails
with MEM_ALLOC on this node). A float graph keeps it: there the guard can matter.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_graphsurgeon as gs

from qcompile.graph_io import constant_values, redirect_consumers
from qcompile.pass_manager import GraphProperty, Pass, PassContext, PassResult
from qcompile.rewrite import Edit, GraphView, Pattern, Rule, apply, find, producer, require


@dataclass(frozen=True)
class NanGuardMatch:
    where: gs.Node
    x: gs.Tensor  # the guarded tensor

    @property
    def nodes(self) -> tuple[gs.Node, ...]:
        return (self.where,)


class NanGuardPattern(Pattern[NanGuardMatch]):
    """Where(IsNaN(x), constant, x)."""

    name = "nan-guard"
    anchors = frozenset({"Where"})

    def match(self, anchor: gs.Node, view: GraphView) -> NanGuardMatch:
        require(len(anchor.inputs) == 3, "the Where has no three inputs")
        cond, fill, x = anchor.inputs
        test = producer(cond)
        require(test is not None and test.op == "IsNaN" and test.inputs[0] is x and constant_values(fill) is not None,
                "the Where is not Where(IsNaN(x), constant, x)")
        return NanGuardMatch(anchor, x)


class RemoveNanGuardRule(NanGuardPattern, Rule[NanGuardMatch]):
    name = "remove-nan-guards"

    def check(self, match: NanGuardMatch, view: GraphView) -> str | None:
        """A guard writing a graph output goes too (HTP refuses the Where at either width; found by
        tests/test_fuzz_qnn.py): x's producer then writes the output, which keeps its name, so x must
        be read by nothing but the guard."""
        if match.where.outputs[0].name not in view.outputs:
            return None
        x, isnan = match.x, producer(match.where.inputs[0])
        if producer(x) is None or x.name in view.outputs or any(c is not match.where and c is not isnan
                                                                 for c in x.outputs):
            return "the guard writes a graph output and its input is read elsewhere"
        return None

    def rewrite(self, match: NanGuardMatch, edit: Edit) -> None:
        y = match.where.outputs[0]
        match.where.outputs.clear()
        if y.name in {t.name for t in edit.graph.outputs}:
            source = producer(match.x)
            source.outputs[source.outputs.index(match.x)] = y
        else:
            redirect_consumers(y, match.x)


def nan_guards(graph: gs.Graph) -> list[tuple[gs.Node, gs.Tensor]]:
    """(Where node, the guarded tensor x) for every Where(IsNaN(x), constant, x)."""
    return [(m.where, m.x) for m in find(graph, NanGuardPattern()).matches]


class RemoveNanGuards(Pass):
    name = "remove-nan-guards"
    preserves = frozenset({GraphProperty.NODES_NAMED, GraphProperty.SHAPES_KNOWN})

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        report = apply(graph, [RemoveNanGuardRule()])
        return PassResult(modified=bool(report.matches), detail=report.detail(f"{len(report.matches)} NaN guard(s)"))
