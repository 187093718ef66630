"""Decomposed RMSNorm -> one `RMSNormalization` node (ONNX opset 23), for integer-only targets.

SD3's and Flux's query/key norms export as
    r = Reciprocal(Sqrt(Add(ReduceMean(Pow(x, 2), axes=[-1]), eps)))  ;  y = Mul(x, r)  [; Mul(y, weight)]
(or Div(x, Sqrt(...))). Quantized op by op at 16 bits, HTP refuses it: the Reciprocal fails to finalize
(QNN_COMMON_ERROR_MEM_ALLOC) for some calibrated ranges and not others (input absmax 0.3 or 1.2 in a
repro, not 0.6 or 0.9; tiny SD3's third QK norm), and Div is refused at any range. One
RMSNormalization node runs on HTP at every range tried (58 dB against fp32 at W8A16, the same as the
Reciprocal form where that compiles), and the norm's intermediates (x^2, its mean, its inverse root:
the worst tensors to quantize) are no longer quantized at all.

The fused node writes the tensor the decomposed norm wrote last, so its calibrated range applies.
The graph's default opset is raised to 23 when anything is fused.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from qcompile.graph_io import raise_opset
from qcompile.pass_manager import GraphProperty, Pass, PassContext, PassResult
from qcompile.passes.fuse_layernorm import (
    NormMatch,
    affine_tail,
    epsilon_root,
    norm_check,
    trailing_norm_shape,
)
from qcompile.rewrite import (
    Edit,
    GraphView,
    Rule,
    apply,
    is_scalar,
    other_operand,
    producer,
    reader,
    require,
    subgraph,
)

RMSNORM_OPSET = 23


class RMSNormRule(Rule[NormMatch]):
    """x * 1/sqrt(mean(x^2) + eps) [* weight], matched from its ReduceMean."""

    name = "fuse-rmsnorm"
    anchors = frozenset({"ReduceMean"})

    def match(self, anchor: gs.Node, view: GraphView) -> NormMatch:
        square = producer(anchor.inputs[0])
        require(square is not None and square.op in ("Pow", "Mul"), "the ReduceMean does not read a square")
        x = square.inputs[0]
        require((square.op == "Pow" and is_scalar(square.inputs[1], 2.0)) or
                (square.op == "Mul" and square.inputs[1] is x), "the ReduceMean does not read a square")
        norm_shape = trailing_norm_shape(anchor, x, view.graph.opset)
        eps, sqrt = epsilon_root(anchor.outputs[0])
        recip = reader(sqrt.outputs[0], "Reciprocal")
        if recip is not None:
            last = reader(recip.outputs[0], "Mul")
            require(last is not None and other_operand(last, recip.outputs[0]) is x,
                    "x is not multiplied by the inverse root")
        else:
            last = reader(sqrt.outputs[0], "Div")
            require(last is not None and last.inputs[0] is x, "x is not divided by the root")
        last, scale, _ = affine_tail(last, norm_shape, view, ("Mul",))
        dtype = np.dtype(x.dtype) if x.dtype is not None else np.dtype(np.float32)
        scale = np.ones(norm_shape, dtype) if scale is None else scale.astype(dtype)  # the output takes its type
        return NormMatch(x, last, -len(norm_shape), float(eps), scale, None, subgraph([x], last.outputs))

    def check(self, match: NormMatch, view: GraphView) -> str | None:
        return norm_check(match, view)

    def rewrite(self, match: NormMatch, edit: Edit) -> None:
        last = match.last
        edit.add("RMSNormalization", f"{last.name}_rmsnorm",
                 [match.x, gs.Constant(f"{last.name}_rmsnorm_scale", match.scale)], [last.outputs[0]],
                 {"axis": match.axis, "epsilon": match.epsilon}, like=last)


class FuseRMSNorm(Pass):
    name = "fuse-rmsnorm"
    requires = frozenset({GraphProperty.SHAPES_KNOWN})
    preserves = frozenset({GraphProperty.NODES_NAMED, GraphProperty.SHAPES_KNOWN})

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        report = apply(graph, [RMSNormRule()])
        if report.matches:
            raise_opset(graph, max(graph.opset, RMSNORM_OPSET))
        return PassResult(modified=bool(report.matches), detail=report.detail(f"{len(report.matches)} fused"))
