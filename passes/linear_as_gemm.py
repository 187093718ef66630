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

import numpy as np
import onnx_graphsurgeon as gs

from qcompile.graph_io import constant_values, tag_new_node
from qcompile.pass_manager import GraphProperty, Pass, PassContext, PassResult

PASS_NAME = "linear-as-gemm"


def _static(shape) -> bool:
    return shape is not None and all(isinstance(d, int) and d >= 0 for d in shape)


class LinearAsGemm(Pass):
    name = PASS_NAME
    requires = frozenset({GraphProperty.SHAPES_KNOWN})
    preserves = frozenset({GraphProperty.NODES_NAMED, GraphProperty.SHAPES_KNOWN})

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        outputs = {t.name for t in graph.outputs}
        count = 0
        for matmul in list(graph.nodes):
            if matmul.op != "MatMul" or not matmul.outputs:
                continue
            x, w, product = matmul.inputs[0], matmul.inputs[1], matmul.outputs[0]
            weight = constant_values(w)
            if weight is None or weight.ndim != 2 or not _static(x.shape) or len(x.shape) < 2 or \
                    len(product.outputs) != 1 or product.name in outputs:
                continue
            add = product.outputs[0]
            if add.op != "Add" or add.outputs[0].name in outputs:
                continue
            other = add.inputs[1] if add.inputs[0] is product else add.inputs[0]
            bias = constant_values(other)
            if bias is None or bias.size != weight.shape[1] or bias.ndim > 1 and any(d != 1 for d in bias.shape[:-1]):
                continue
            k, n = weight.shape
            rows = int(np.prod(x.shape[:-1]))
            y = add.outputs[0]
            bias_t = other if bias.ndim == 1 else gs.Constant(f"{add.name}_bias", bias.reshape(-1))
            new: list[gs.Node] = []
            if len(x.shape) == 2:
                gemm_in = x
            else:
                gemm_in = gs.Variable(f"{matmul.name}_rows", x.dtype, [rows, k])
                new.append(gs.Node("Reshape", f"{matmul.name}_to_rows", {},
                                   [x, gs.Constant(f"{matmul.name}_rows_shape", np.array([rows, k], np.int64))],
                                   [gemm_in]))
            add.outputs.clear()
            matmul.outputs.clear()
            if len(x.shape) == 2:
                new.append(gs.Node("Gemm", matmul.name, {}, [gemm_in, w, bias_t], [y]))
            else:
                out = gs.Variable(y.name, y.dtype, [rows, n])
                y.name = f"{y.name}_unflattened"
                new.append(gs.Node("Gemm", matmul.name, {}, [gemm_in, w, bias_t], [out]))
                new.append(gs.Node("Reshape", f"{matmul.name}_from_rows", {},
                                   [out, gs.Constant(f"{matmul.name}_out_shape", np.array(y.shape, np.int64))], [y]))
            graph.nodes.extend(tag_new_node(node, PASS_NAME, like=matmul) for node in new)
            count += 1
        if count:
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(modified=bool(count), detail=f"{count} MatMul + bias as Gemm")
