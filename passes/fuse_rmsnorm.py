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

from qcompile.graph_io import constant_values, raise_opset, tag_new_node
from qcompile.pass_manager import GraphProperty, Pass, PassContext, PassResult

RMSNORM_OPSET = 23


def _only_consumer(t: gs.Tensor) -> gs.Node | None:
    return t.outputs[0] if len(t.outputs) == 1 else None


def _squared_input(node: gs.Node) -> gs.Tensor | None:
    """x for Pow(x, 2) or Mul(x, x)."""
    if node.op == "Pow" and constant_values(node.inputs[1]) is not None and \
            np.all(constant_values(node.inputs[1]) == 2):
        return node.inputs[0]
    if node.op == "Mul" and node.inputs[0] is node.inputs[1]:
        return node.inputs[0]
    return None


def _last_axis_mean(node: gs.Node) -> bool:
    axes = node.attrs.get("axes")
    if axes is None and len(node.inputs) > 1:
        axes = constant_values(node.inputs[1])
    rank = len(node.inputs[0].shape) if node.inputs[0].shape is not None else None
    if axes is None or np.size(axes) != 1 or not node.attrs.get("keepdims", 1):
        return False
    axis = int(np.asarray(axes).reshape(-1)[0])
    return axis == -1 or (rank is not None and axis == rank - 1)


def match_rmsnorm(sqrt: gs.Node) -> tuple[gs.Tensor, float, list[gs.Node], gs.Node] | None:
    """(x, eps, nodes of the norm, the node writing its result) for the RMSNorm around this Sqrt."""
    add = sqrt.inputs[0].inputs[0] if sqrt.inputs[0].inputs else None
    if add is None or add.op != "Add":
        return None
    mean, eps = next(((i.inputs[0], constant_values(c)) for i, c in (add.inputs, add.inputs[::-1])
                      if i.inputs and constant_values(c) is not None and i.inputs[0].op == "ReduceMean"), (None, None))
    if mean is None or np.size(eps) != 1 or not _last_axis_mean(mean) or not mean.inputs[0].inputs:
        return None
    square = mean.inputs[0].inputs[0]
    x = _squared_input(square)
    if x is None:
        return None
    nodes = [square, mean, add, sqrt]
    after = _only_consumer(sqrt.outputs[0])
    if after is not None and after.op == "Reciprocal":
        nodes.append(after)
        after = _only_consumer(after.outputs[0])
        if after is None or after.op != "Mul" or x not in after.inputs:
            return None
    elif after is None or after.op != "Div" or after.inputs[0] is not x:
        return None
    nodes.append(after)
    if any(len(n.outputs[0].outputs) != 1 for n in nodes[:-1]):
        return None  # an intermediate read elsewhere must stay
    return x, float(np.asarray(eps).reshape(-1)[0]), nodes, after


class FuseRMSNorm(Pass):
    name = "fuse-rmsnorm"
    requires = frozenset({GraphProperty.SHAPES_KNOWN})
    preserves = frozenset({GraphProperty.NODES_NAMED, GraphProperty.SHAPES_KNOWN})

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        fused = 0
        for sqrt in [n for n in graph.nodes if n.op == "Sqrt"]:
            found = match_rmsnorm(sqrt)
            if found is None:
                continue
            x, eps, nodes, last = found
            channels = x.shape[-1] if x.shape is not None else None
            if not isinstance(channels, int):
                continue
            out, scale = last.outputs[0], np.ones(channels, np.float32)
            weight_mul = _only_consumer(out)
            if weight_mul is not None and weight_mul.op == "Mul":
                w = next((constant_values(i) for i in weight_mul.inputs if i is not out), None)
                if w is not None and w.size == channels and w.shape[-1:] == (channels,):
                    nodes.append(weight_mul)
                    out, scale = weight_mul.outputs[0], w.reshape(channels).astype(np.float32)
            node = gs.Node("RMSNormalization", f"{last.name}_rmsnorm", attrs={"axis": -1, "epsilon": eps},
                           inputs=[x, gs.Constant(f"{last.name}_rmsnorm_scale", scale)], outputs=[out])
            tag_new_node(node, self.name, like=last)
            for n in nodes:
                n.outputs.clear()
            graph.nodes.append(node)
            fused += 1
        if fused:
            raise_opset(graph, max(graph.opset, RMSNORM_OPSET))
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(modified=bool(fused), detail=f"{fused} fused")
