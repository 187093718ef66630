"""A linear layer exported as MatMul + Add(bias) as one Gemm over the flattened rows.

Exporters write `nn.Linear` on a [B, L, K] activation as MatMul(x, W[K, N]) followed by Add(bias[N]).
In an integer graph that costs a quantized intermediate (the product before the bias) and an
elementwise Add whose bias is an 8-bit activation-like constant; as Gemm the bias is int32 at
s_x * s_w and the weight per output channel, which is what integer FullyConnected kernels take.
On QNN's HTP it is also what compiles: LayerNorm -> MatMul -> Add(uint8 bias) -> Split -> Gelu -> Mul
(a GEGLU feed-forward) fails to finalize with QNN_COMMON_ERROR_MEM_ALLOC at 16-bit activations, the
same layer as Reshape -> Gemm -> Reshape agrees with the CPU EP to 55 dB.

Rewrite: x[..., K] -> Reshape [M, K] -> Gemm(W, bias) -> Reshape [..., N]. The Gemm output takes the
Add output's name (so calibrated ranges recorded on the canonical graph apply to it) and the restored
tensor is renamed `<name>_unflattened`; shapes must be static.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from qcompile.graph_io import constant_values
from qcompile.pass_manager import GraphProperty, Pass, PassContext, PassResult
from qcompile.rewrite import Edit, GraphView, Rule, apply, is_static, other_operand, require

PASS_NAME = "linear-as-gemm"


@dataclass(frozen=True)
class LinearMatch:
    matmul: gs.Node
    add: gs.Node
    bias: gs.Tensor

    @property
    def nodes(self) -> tuple[gs.Node, ...]:
        return (self.matmul, self.add)


class LinearRule(Rule[LinearMatch]):
    name = PASS_NAME
    anchors = frozenset({"MatMul"})

    def match(self, anchor: gs.Node, view: GraphView) -> LinearMatch:
        weight = constant_values(anchor.inputs[1])
        require(weight is not None and weight.ndim == 2, "the MatMul has no 2-D constant weight")
        add = view.only_consumer(anchor.outputs[0], "Add")
        require(add is not None, "the MatMul's product is not only read by an Add")
        return LinearMatch(anchor, add, other_operand(add, anchor.outputs[0]))

    def check(self, match: LinearMatch, view: GraphView) -> str | None:
        x, n = match.matmul.inputs[0], constant_values(match.matmul.inputs[1]).shape[1]
        bias = constant_values(match.bias)
        if bias is None or bias.size != n or bias.ndim > 1 and any(d != 1 for d in bias.shape[:-1]):
            return "the Add is not a bias over the output channels"
        if not is_static(x.shape) or len(x.shape) < 2:
            return "the input shape is not static"
        if match.add.outputs[0].name in view.outputs:
            return "the biased product is a graph output"
        return None

    def rewrite(self, match: LinearMatch, edit: Edit) -> None:
        matmul, add = match.matmul, match.add
        x, w, y = matmul.inputs[0], matmul.inputs[1], add.outputs[0]
        k, n = constant_values(w).shape
        bias = constant_values(match.bias)
        bias_t = match.bias if bias.ndim == 1 else gs.Constant(f"{add.name}_bias", bias.reshape(-1))
        if len(x.shape) == 2:
            edit.add("Gemm", matmul.name, [x, w, bias_t], [y], like=matmul)
            return
        rows = int(np.prod(x.shape[:-1]))
        gemm_in = gs.Variable(f"{matmul.name}_rows", x.dtype, [rows, k])
        edit.add("Reshape", f"{matmul.name}_to_rows",
                 [x, gs.Constant(f"{matmul.name}_rows_shape", np.array([rows, k], np.int64))], [gemm_in], like=matmul)
        out = gs.Variable(y.name, y.dtype, [rows, n])  # the Gemm's output takes the name ranges were recorded under
        y.name = f"{y.name}_unflattened"
        edit.add("Gemm", matmul.name, [gemm_in, w, bias_t], [out], like=matmul)
        out_shape = gs.Constant(f"{matmul.name}_out_shape", np.array(y.shape, np.int64))
        edit.add("Reshape", f"{matmul.name}_from_rows", [out, out_shape], [y], like=matmul)


class LinearAsGemm(Pass):
    name = PASS_NAME
    requires = frozenset({GraphProperty.SHAPES_KNOWN})
    preserves = frozenset({GraphProperty.NODES_NAMED, GraphProperty.SHAPES_KNOWN})

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        report = apply(graph, [LinearRule()])
        return PassResult(modified=bool(report.matches),
                          detail=report.detail(f"{len(report.matches)} MatMul + bias as Gemm"))
