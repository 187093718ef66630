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
            y = last.outputs[0]
            last.outputs.clear()  # detached: cleanup removes the decomposed nodes
            x, y, reshapes = _as_rank3(x, y, -axis, outs, f"{last.name}_rmsnorm")
            node = gs.Node("RMSNormalization", f"{last.name}_rmsnorm", attrs={"axis": axis, "epsilon": eps},
                           inputs=[x, gs.Constant(f"{last.name}_rmsnorm_scale", scale)], outputs=[y])
            graph.nodes.extend(tag_new_node(n, self.name, like=last) for n in [node, *reshapes])
            fused += 1
        if fused:
            raise_opset(graph, max(graph.opset, RMSNORM_OPSET))
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(modified=bool(fused), detail=f"{fused} fused")


def _as_rank3(x: gs.Tensor, y: gs.Tensor, norm_axes: int, outs: set[str], base: str):
    """(input, output, reshapes) of the fused norm: every axis before the normalized ones merged into
    one, behind a unit batch ([2, heads, L, D] -> [1, 2 * heads * L, D]).

    Why: QNN HTP (onnxruntime-qnn 2.7.0 simulator) computes an 8-bit RMSNormalization wrong, from the
    same integer inputs as the CPU EP, for some leading shapes over a short normalized axis: [2, 10, 2, 4]
    (the rows of channels 8 and 9 come out zero, up to 250 LSB off), [2, 16, 4] and [2, 4, 32, 16] (the
    second sample's rows); [2, 10, 4], [2, 20, 4] and an SD3-sized [2, 24, 16, 64] were right. The same
    rows as [1, R, D] agreed with the CPU EP to a rounding step in every case tried (found by
    tests/test_fuzz_qnn.py, pinned in tests/test_fuzz_found.py). The norm output keeps the name
    calibration recorded (its range is that of the restored tensor, renamed `<name>_unflattened`); a
    graph output, a symbolic shape or one already [1, R, ...] stays as it is."""
    shape = x.shape
    lead = len(shape) - norm_axes if shape is not None else 0
    if lead < 1 or y.name in outs or not all(isinstance(d, int) and d > 0 for d in shape) or \
            (lead == 2 and shape[0] == 1):
        return x, y, []
    rows = int(np.prod(shape[:lead]))
    flat = gs.Variable(f"{base}_rank3", x.dtype, [1, rows, *shape[lead:]])
    out = gs.Variable(y.name, y.dtype, flat.shape)
    y.name = f"{y.name}_unflattened"
    return flat, out, [
        gs.Node("Reshape", f"{base}_to_rank3", {},
                [x, gs.Constant(f"{base}_rank3_shape", np.array(flat.shape, np.int64))], [flat]),
        gs.Node("Reshape", f"{base}_from_rank3", {},
                [out, gs.Constant(f"{base}_restore_shape", np.array(shape, np.int64))], [y])]
