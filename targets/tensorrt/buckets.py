"""Timestep buckets in one TensorRT engine: constant scales, a rescale factor picked by bucket at run time.

K buckets differ only in their activation scales s_b. TensorRT (up to 10.12) needs each Q/DQ scale
to be a build-time constant, so K buckets would be K engines. Instead, each quantized activation gets
one constant scale s0 and a run-time factor r_b = s_b / s0:

    Q(x, s_b) = Q(x / r_b, s0)        DQ(q, s_b) = DQ(q, s0) * r_b

The engine takes the bucket index as an int64 input `qcompile_bucket` of shape [1]; every
quantized activation gathers its r_b from a constant [K] column. s0 is a power of two (the one
nearest the geometric mean of the bucket scales), so x / r_b = (x / s_b) * s0 exactly in float32
(scaling by a power of two is exact) and the quantized integers are bit for bit those of bucket b's
own graph; the dequantized values are too (q * s0 * r_b rounds once, like q * s_b). A division, not
x * (s0 / s_b): the product rounds twice and flips ties of the rounding to integers.
`tests/test_trt_buckets.py` proves the equality in onnxruntime.

Where the factor goes back (`RescaleAt`):
- INPUT (the default): `DQ(q, s0) * r_b` before every reader. Bit-exact in onnxruntime, but a layer
  then reads a Mul, not a DQ: TensorRT fuses Q/DQ only through ops that commute with quantization,
  so it would likely run such a layer in float (unverified).
- OUTPUT: a Conv/ConvTranspose/Gemm/MatMul reads `DQ(q, s0)` itself and its output is multiplied by
  r_b (its bias moved after the Mul: layer(x * r) = layer_without_bias(x) * r + bias), so the layer keeps
  its DQ -> layer pattern and the Mul sits in its epilogue. The quantized integers of the graph's first
  quantization points are still bit-exact; after a rescaled layer the float values differ in the last
  bits, which flips a later rounding at rare ties (measured in `tests/test_trt_buckets.py`).
Other readers (a residual Add) get the INPUT form in both.

What is not verified here (no TensorRT): which form TensorRT fuses into its int8/FP8 kernels; the
README lists them and the alternatives for GPU users to measure (TensorRT >= 10.13 non-constant
scales, a refit per bucket).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_graphsurgeon as gs

from qcompile.graph_io import constant_values, copy_graph, redirect_consumers, tag_new_node
from qcompile.rewrite import is_activation, producer
from qcompile.targets.tensorrt.lint import RESCALE_PREFIX
from qcompile.targets.tensorrt.options import RescaleAt

BUCKET_INPUT = "qcompile_bucket"
LAYER_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
PASS_NAME = "trt-one-engine-buckets"


def activation_quantizers(graph: gs.Graph) -> list[gs.Node]:
    """The QuantizeLinear nodes on activations (not on constant weights), in graph order."""
    return [n for n in graph.nodes if n.op == "QuantizeLinear" and is_activation(n.inputs[0])]


def power_of_two(scales: np.ndarray) -> np.float32:
    return np.float32(2.0 ** np.round(np.mean(np.log2(np.asarray(scales, np.float64)))))


def one_engine_graph(graphs: Sequence[gs.Graph], at: RescaleAt = RescaleAt.INPUT) -> gs.Graph:
    """The K bucket graphs (same nodes, different activation scales) as one graph with a bucket input."""
    per_bucket = [{n.name: n for n in activation_quantizers(g)} for g in graphs]
    merged = copy_graph(graphs[0])
    bucket = gs.Variable(BUCKET_INPUT, dtype=np.int64, shape=[1])
    merged.inputs.append(bucket)
    for index, q in enumerate(activation_quantizers(merged)):
        scales = np.array([float(constant_values(b[q.name].inputs[1])) for b in per_bucket], np.float64)
        dq = next(c for c in q.outputs[0].outputs if c.op == "DequantizeLinear")
        s0 = power_of_two(scales)
        column = gs.Constant(f"{RESCALE_PREFIX}_table_{index}", (scales / np.float64(s0)).astype(np.float32))
        rescale = gs.Variable(f"{RESCALE_PREFIX}_{index}", dtype=np.float32, shape=[1])
        like = producer(q.inputs[0]) or q
        merged.nodes.append(tag_new_node(gs.Node("Gather", f"{RESCALE_PREFIX}_gather_{index}", {"axis": 0},
                                                 [column, bucket], [rescale]), PASS_NAME, like))
        x = q.inputs[0]
        divided = gs.Variable(f"{x.name}_rescaled", dtype=np.float32, shape=x.shape)
        merged.nodes.append(tag_new_node(gs.Node("Div", f"{x.name}_rescale_Div", {}, [x, rescale], [divided]),
                                         PASS_NAME, like))
        q.inputs[0] = divided
        scale = gs.Constant(f"{q.inputs[1].name}_bucket0", np.asarray(s0, np.float32))
        q.inputs[1] = scale
        dq.inputs[1] = scale
        out = dq.outputs[0]
        readers = list(out.outputs)
        if at is RescaleAt.OUTPUT:
            readers = [n for n in readers if not _rescale_output(merged, n, out, rescale)]
        if readers:
            restored = gs.Variable(f"{out.name}_restored", dtype=np.float32, shape=out.shape)
            mul = gs.Node("Mul", f"{out.name}_rescale_Mul", {}, [out, rescale], [restored])
            merged.nodes.append(tag_new_node(mul, PASS_NAME, like))
            redirect_consumers(out, restored, readers)
    merged.toposort()
    return merged


def _rescale_output(graph: gs.Graph, layer: gs.Node, dequantized: gs.Tensor, rescale: gs.Tensor) -> bool:
    """Move the factor behind a linear layer reading `dequantized` once: y = layer_without_bias(x) * r + b.
    False when the layer is not one this applies to (it then keeps the Mul before it)."""
    if layer.op not in LAYER_OPS or sum(t is dequantized for t in layer.inputs) != 1:
        return False
    if dequantized is not layer.inputs[0] and dequantized is not layer.inputs[1]:
        return False  # a bias input
    bias = layer.inputs[2] if len(layer.inputs) > 2 and layer.inputs[2].name else None
    if bias is not None:
        values = constant_values(bias)
        if values is None or (layer.op == "Gemm" and float(layer.attrs.get("beta", 1.0)) != 1.0):
            return False
        if layer.op in ("Conv", "ConvTranspose"):  # [C] against [N, C, spatial...]
            rank = len(layer.outputs[0].shape) if layer.outputs[0].shape else 4
            values = values.reshape((-1,) + (1,) * (rank - 2))
        bias = gs.Constant(f"{layer.name}_bias_after_rescale", np.asarray(values, np.float32))
        layer.inputs.pop(2)
    out = layer.outputs[0]
    raw = gs.Variable(f"{out.name}_before_rescale", dtype=out.dtype, shape=out.shape)
    layer.outputs[0] = raw
    scaled = out if bias is None else gs.Variable(f"{out.name}_rescaled", dtype=out.dtype, shape=out.shape)
    graph.nodes.append(tag_new_node(gs.Node("Mul", f"{layer.name}_{dequantized.name}_rescale_Mul", {},
                                            [raw, rescale], [scaled]), PASS_NAME, layer))
    if bias is not None:
        graph.nodes.append(tag_new_node(gs.Node("Add", f"{layer.name}_bias_after_rescale_Add", {},
                                                [scaled, bias], [out]), PASS_NAME, layer))
    return True
