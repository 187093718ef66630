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

from qcompile.graph_io import raise_opset, tag_new_node
from qcompile.pass_manager import GraphProperty, Pass, PassContext, PassResult
from qcompile.passes.fuse_layernorm import (
    affine_operand,
    epsilon_root,
    only_consumer,
    other_operand,
    scalar_value,
    trailing_norm_shape,
)

RMSNORM_OPSET = 23


def match_rmsnorm(mean: gs.Node, opset: int, outs: set[str]):
    """(x, node writing the result, axis, eps, scale) for the RMSNorm whose ReduceMean this is, else None.
    No intermediate may be read elsewhere or be a graph output: they all disappear."""
    square = mean.inputs[0].inputs[0] if mean.inputs[0].inputs else None
    if square is None or square.op not in ("Pow", "Mul") or len(mean.inputs[0].outputs) != 1 \
            or mean.inputs[0].name in outs:
        return None
    x = square.inputs[0]
    if not (square.op == "Pow" and scalar_value(square.inputs[1]) == 2.0) and \
            not (square.op == "Mul" and square.inputs[1] is x):
        return None
    norm_shape = trailing_norm_shape(mean, x, opset)
    root = epsilon_root(mean.outputs[0], outs) if norm_shape is not None else None
    if root is None:
        return None
    eps, sqrt = root
    recip = only_consumer(sqrt.outputs[0], outs, "Reciprocal")
    if recip is not None:
        last = only_consumer(recip.outputs[0], outs, "Mul")
        if last is None or other_operand(last, recip.outputs[0]) is not x:
            return None
    else:
        last = only_consumer(sqrt.outputs[0], outs, "Div")
        if last is None or last.inputs[0] is not x:
            return None
    dtype = np.dtype(x.dtype) if x.dtype is not None else np.dtype(np.float32)
    scale = None
    weight = only_consumer(last.outputs[0], outs, "Mul")
    if weight is not None and (scale := affine_operand(weight, last.outputs[0], norm_shape)) is not None:
        last = weight
    scale = np.ones(norm_shape, dtype) if scale is None else scale.astype(dtype)  # the output takes its type
    return x, last, -len(norm_shape), float(eps), scale


class FuseRMSNorm(Pass):
    name = "fuse-rmsnorm"
    requires = frozenset({GraphProperty.SHAPES_KNOWN})
    preserves = frozenset({GraphProperty.NODES_NAMED, GraphProperty.SHAPES_KNOWN})

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        outs = {t.name for t in graph.outputs}
        fused = 0
        for mean in [n for n in graph.nodes if n.op == "ReduceMean"]:
            found = match_rmsnorm(mean, graph.opset, outs)
            if found is None:
                continue
            x, last, axis, eps, scale = found
            node = gs.Node("RMSNormalization", f"{last.name}_rmsnorm", attrs={"axis": axis, "epsilon": eps},
                           inputs=[x, gs.Constant(f"{last.name}_rmsnorm_scale", scale)], outputs=[last.outputs[0]])
            last.outputs.clear()  # detached: cleanup removes the decomposed nodes
            graph.nodes.append(tag_new_node(node, self.name, like=last))
            fused += 1
        if fused:
            raise_opset(graph, max(graph.opset, RMSNORM_OPSET))
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(modified=bool(fused), detail=f"{fused} fused")
