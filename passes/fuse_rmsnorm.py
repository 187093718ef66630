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
        """The norm over [1, R, D]: every axis before the normalized ones merged into one, behind a unit
        batch ([2, heads, L, D] -> [1, 2 * heads * L, D]).

        Why: QNN HTP (onnxruntime-qnn 2.7.0 simulator) computes an 8-bit RMSNormalization wrong, from the
        same integer inputs as the CPU EP, for some leading shapes over a short normalized axis: [2, 10,
        2, 4] (the rows of channels 8 and 9 come out zero, up to 250 LSB off), [2, 16, 4] and [2, 4, 32,
        16] (the second sample's rows); [2, 10, 4], [2, 20, 4] and an SD3-sized [2, 24, 16, 64] were
        right. The same rows as [1, R, D] agreed with the CPU EP to a rounding step in every case tried
        (found by tests/test_fuzz_qnn.py, pinned in tests/test_fuzz_found.py). The norm output keeps the
        name calibration recorded (its range is that of the restored tensor, renamed `<name>_unflattened`);
        a graph output, a symbolic shape or one already [1, R, ...] stays as it is."""
        last, x = match.last, match.x
        y = last.outputs[0]
        base = f"{last.name}_rmsnorm"
        scale = gs.Constant(f"{base}_scale", match.scale)
        attrs = {"axis": match.axis, "epsilon": match.epsilon}
        shape = x.shape
        lead = len(shape) + match.axis if shape is not None else 0
        if lead < 1 or y.name in {t.name for t in edit.graph.outputs} or \
                not all(isinstance(d, int) and d > 0 for d in shape) or (lead == 2 and shape[0] == 1):
            edit.add("RMSNormalization", base, [x, scale], [y], attrs, like=last)
            return
        flat = gs.Variable(f"{base}_rank3", x.dtype, [1, int(np.prod(shape[:lead])), *shape[lead:]])
        name = y.name
        y.name = f"{name}_unflattened"
        out = gs.Variable(name, y.dtype, flat.shape)
        to_rows = gs.Constant(f"{base}_rank3_shape", np.array(flat.shape, np.int64))
        restore = gs.Constant(f"{base}_restore_shape", np.array(shape, np.int64))
        edit.add("Reshape", f"{base}_to_rank3", [x, to_rows], [flat], like=last)
        edit.add("RMSNormalization", base, [flat, scale], [out], attrs, like=last)
        edit.add("Reshape", f"{base}_from_rank3", [out, restore], [y], like=last)


class FuseRMSNorm(Pass):
    name = "fuse-rmsnorm"
    requires = frozenset({GraphProperty.SHAPES_KNOWN})
    preserves = frozenset({GraphProperty.NODES_NAMED, GraphProperty.SHAPES_KNOWN})

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        report = apply(graph, [RMSNormRule()])
        if report.matches:
            raise_opset(graph, max(graph.opset, RMSNORM_OPSET))
        return PassResult(modified=bool(report.matches), detail=report.detail(f"{len(report.matches)} fused"))
