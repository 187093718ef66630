"""Remove `Where(IsNaN(x), c, x)` guards: x itself, for integer-only targets.

Exporters of scaled-dot-product attention write a guard after the softmax so that a row masked
entirely (all -inf, softmax NaN) becomes zeros instead. In an integer-only graph no tensor can be NaN
(a quantized softmax output is a number on its grid), so the guard computes nothing, yet it costs a
boolean tensor and a Where that QNN's HTP refuses at 16 bits (tiny CLIP text encoder: finalize fails
with MEM_ALLOC on this node). A float graph keeps it: there the guard can matter.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from qcompile.graph_io import constant_values, redirect_consumers
from qcompile.pass_manager import GraphProperty, Pass, PassContext, PassResult


def nan_guards(graph: gs.Graph) -> list[tuple[gs.Node, gs.Tensor]]:
    """(Where node, the guarded tensor x) for every Where(IsNaN(x), constant, x)."""
    out = []
    for node in graph.nodes:
        if node.op != "Where" or len(node.inputs) != 3:
            continue
        cond, fill, x = node.inputs
        test = cond.inputs[0] if cond.inputs else None
        if test is not None and test.op == "IsNaN" and test.inputs[0] is x and constant_values(fill) is not None:
            out.append((node, x))
    return out


class RemoveNanGuards(Pass):
    name = "remove-nan-guards"
    preserves = frozenset({GraphProperty.NODES_NAMED, GraphProperty.SHAPES_KNOWN})

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        guards = nan_guards(graph)
        outputs = {t.name for t in graph.outputs}
        removed = 0
        for node, x in guards:
            y = node.outputs[0]
            if y.name in outputs:
                # A graph output keeps its name: x's producer writes it, when only the guard reads x
                # (else the guard stays; HTP refuses it at either width, found by tests/test_fuzz_qnn.py).
                producer = x.inputs[0] if len(x.inputs) == 1 else None
                if producer is None or x.name in outputs or \
                        any(c is not node and c is not node.inputs[0].inputs[0] for c in x.outputs):
                    continue
                node.outputs.clear()
                producer.outputs[producer.outputs.index(x)] = y
            else:
                redirect_consumers(y, x)
                node.outputs.clear()
            removed += 1
        if removed:
            graph.cleanup().toposort()
        return PassResult(modified=bool(removed), detail=f"{removed} NaN guard(s)")
