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

What is not verified here (no TensorRT): whether TensorRT fuses the run-time Div before a Q and the
Mul after a DQ into its int8/FP8 kernels or runs them as extra pointwise layers; the README lists the
alternatives for GPU users to measure (TensorRT >= 10.13 non-constant scales, a refit per bucket).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_graphsurgeon as gs

from qcompile.graph_io import constant_values, copy_graph, redirect_consumers, tag_new_node
from qcompile.rewrite import is_activation, producer
from qcompile.targets.tensorrt.lint import RESCALE_PREFIX

BUCKET_INPUT = "qcompile_bucket"
PASS_NAME = "trt-one-engine-buckets"


def activation_quantizers(graph: gs.Graph) -> list[gs.Node]:
    """The QuantizeLinear nodes on activations (not on constant weights), in graph order."""
    return [n for n in graph.nodes if n.op == "QuantizeLinear" and is_activation(n.inputs[0])]


def power_of_two(scales: np.ndarray) -> np.float32:
    return np.float32(2.0 ** np.round(np.mean(np.log2(np.asarray(scales, np.float64)))))


def one_engine_graph(graphs: Sequence[gs.Graph]) -> gs.Graph:
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
        restored = gs.Variable(f"{out.name}_restored", dtype=np.float32, shape=out.shape)
        readers = list(out.outputs)
        mul = gs.Node("Mul", f"{out.name}_rescale_Mul", {}, [out, rescale], [restored])
        merged.nodes.append(tag_new_node(mul, PASS_NAME, like))
        redirect_consumers(out, restored, readers)
    merged.toposort()
    return merged
