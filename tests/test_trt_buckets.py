"""One engine for every timestep bucket: the one-engine graph (constant scales s0, a run-time factor
r_b = s_b / s0 picked by a bucket input) equals each bucket's own Q/DQ graph in onnxruntime, bit for bit
on every quantized (integer / float8) tensor; node by node (Q/DQ semantics, no fused kernels) on the
output too. With onnxruntime's optimizations on, the int8 bucket graph runs fused integer kernels that
the rescaled graph does not get, so only the quantized tensors are compared there."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import pytest

from qcompile.graph_io import copy_graph, save_graph
from qcompile.pass_manager import PassContext
from qcompile.passes.insert_qdq import plan_quantization
from qcompile.quant import TensorRange
from qcompile.runtime import make_session
from qcompile.target import BucketJob
from qcompile.targets.tensorrt.buckets import BUCKET_INPUT, activation_quantizers, one_engine_graph
from qcompile.targets.tensorrt.lint import LintRules, lint
from qcompile.targets.tensorrt.options import RescaleAt, TrtOptions
from qcompile.targets.tensorrt.target import TrtFp8Target, TrtInt8Target

K = 3


def float_graph() -> gs.Graph:
    """Conv + bias -> Add(residual) -> Relu -> [B, HW, C] -> MatMul + bias: a conv with its skip Add
    and a linear layer, as in a UNet block."""
    rng = np.random.default_rng(0)
    x = gs.Variable("x", np.float32, (2, 32, 8, 8))

    def var(name, shape):
        return gs.Variable(name, np.float32, shape)

    conv, res, act, flat, lin, out = (var("conv", (2, 32, 8, 8)), var("res", (2, 32, 8, 8)),
                                      var("act", (2, 32, 8, 8)), var("flat", (2, 32, 64)), var("tokens", (2, 64, 32)),
                                      var("y", (2, 64, 48)))
    mm = var("mm", (2, 64, 48))
    nodes = [
        gs.Node("Conv", "conv", {"pads": [1, 1, 1, 1]},
                [x, gs.Constant("w", rng.normal(0, 0.1, (32, 32, 3, 3)).astype(np.float32)),
                 gs.Constant("b", rng.normal(0, 0.1, 32).astype(np.float32))], [conv]),
        gs.Node("Add", "skip_add", {}, [conv, x], [res]),
        gs.Node("Relu", "relu", {}, [res], [act]),
        gs.Node("Reshape", "reshape", {}, [act, gs.Constant("shape", np.array([2, 32, 64], np.int64))], [flat]),
        gs.Node("Transpose", "transpose", {"perm": [0, 2, 1]}, [flat], [lin]),
        gs.Node("MatMul", "linear", {}, [lin, gs.Constant("wl", rng.normal(0, 0.2, (32, 48)).astype(np.float32))],
                [mm]),
        gs.Node("Add", "linear_bias", {}, [mm, gs.Constant("bl", rng.normal(0, 0.1, 48).astype(np.float32))], [out]),
    ]
    return gs.Graph(nodes=nodes, inputs=[x], outputs=[out], opset=20)


def bucket_graphs(target, graph: gs.Graph) -> list[gs.Graph]:
    """K bucket graphs with deliberately different (non power-of-two) activation ranges."""
    plan = plan_quantization(graph, target.caps)
    out = []
    for b in range(K):
        ranges = {name: TensorRange(-(1.7 + 0.9 * b + 0.13 * i), 2.3 + 1.1 * b + 0.07 * i)
                  for i, name in enumerate(plan.activations)}
        out.append(target.compile_bucket(copy_graph(graph), BucketJob(b, plan, ranges, None), PassContext()).graph)
    return out


def with_quantized_outputs(graph: gs.Graph) -> list[str]:
    """Expose every activation Q output as a graph output; returns their names."""
    names = []
    for q in activation_quantizers(graph):
        graph.outputs.append(q.outputs[0])
        names.append(q.outputs[0].name)
    return names


def inputs_on_ties(scales: list[float]) -> np.ndarray:
    """Random values, a third of them exactly half-way between two steps of some bucket's grid (where a
    rounding that differs in the last bit shows)."""
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1.5, (2, 32, 8, 8)).astype(np.float32)
    flat = x.reshape(-1)
    for i in range(0, flat.size, 3):
        s = np.float32(scales[i % len(scales)])
        flat[i] = (np.float32(np.round(flat[i] / s)) + np.float32(0.5)) * s
    return x


@pytest.mark.parametrize("target,optimize", [(TrtInt8Target(), False), (TrtInt8Target(), True),
                                             (TrtFp8Target(), False)], ids=["int8", "int8-optimized", "fp8"])
def test_one_engine_graph_equals_each_bucket(tmp_path, target, optimize):
    graphs = bucket_graphs(target, float_graph())
    merged = one_engine_graph(graphs)
    assert BUCKET_INPUT in [t.name for t in merged.inputs]
    assert lint(merged, LintRules()) == []
    x_scales = [float(activation_quantizers(g)[0].inputs[1].values) for g in graphs]
    names = with_quantized_outputs(merged)
    assert len(names) == 2  # x (conv input and skip-Add residual) and the linear layer's input
    one = make_session(save_graph(merged, tmp_path / "one.onnx"), optimize=optimize)
    x = inputs_on_ties(x_scales)
    for b, graph in enumerate(graphs):
        assert with_quantized_outputs(graph) == names
        own = make_session(save_graph(graph, tmp_path / f"b{b}.onnx"), optimize=optimize)
        expected = own.run(None, {"x": x})
        got = one.run(None, {"x": x, BUCKET_INPUT: np.array([b], np.int64)})
        compared = list(zip(["y", *names], expected, got, strict=True))
        for name, e, g in compared[1:] if optimize else compared:
            assert e.dtype == g.dtype
            np.testing.assert_array_equal(e.view(np.uint8), g.view(np.uint8), err_msg=f"bucket {b}: {name}")
        # the buckets really differ: another bucket's scales give other integers
        other = one.run(None, {"x": x, BUCKET_INPUT: np.array([(b + 1) % K], np.int64)})
        assert not np.array_equal(other[1].view(np.uint8), expected[1].view(np.uint8))


def test_one_engine_graph_keeps_constant_scales():
    graphs = bucket_graphs(TrtInt8Target(TrtOptions()), float_graph())
    merged = one_engine_graph(graphs)
    for q in activation_quantizers(merged):
        scale = float(q.inputs[1].values)
        assert isinstance(q.inputs[1], gs.Constant) and scale == 2.0 ** round(np.log2(scale))


@pytest.mark.parametrize("target", [TrtInt8Target(), TrtFp8Target()], ids=["int8", "fp8"])
def test_rescale_after_layers(tmp_path, target):
    """RescaleAt.OUTPUT: every layer reads its DQ directly (the pattern TensorRT fuses) and the factor
    comes back behind it, the bias after it. The quantized tensors of this graph stay bit-exact; the
    output differs in the last bits (measured 139 dB), which in a deeper graph can flip a later
    rounding at a tie."""
    graphs = bucket_graphs(target, float_graph())
    merged = one_engine_graph(graphs, RescaleAt.OUTPUT)
    assert lint(merged, LintRules(rescale_before_layers=False)) == []
    for layer in (n for n in merged.nodes if n.op in ("Conv", "MatMul")):
        assert all(t.inputs[0].op == "DequantizeLinear" for t in layer.inputs[:2])
        assert len(layer.inputs) == 2  # the bias moved behind the rescale
    names = with_quantized_outputs(merged)
    one = make_session(save_graph(merged, tmp_path / "one.onnx"), optimize=False)
    x = inputs_on_ties([float(activation_quantizers(g)[0].inputs[1].values) for g in graphs])
    for b, graph in enumerate(graphs):
        assert with_quantized_outputs(graph) == names
        expected = make_session(save_graph(graph, tmp_path / f"b{b}.onnx"), optimize=False).run(None, {"x": x})
        got = one.run(None, {"x": x, BUCKET_INPUT: np.array([b], np.int64)})
        for name, e, g in zip(names, expected[1:], got[1:], strict=True):
            np.testing.assert_array_equal(e.view(np.uint8), g.view(np.uint8), err_msg=f"bucket {b}: {name}")
        y, y1 = expected[0].astype(np.float64), got[0].astype(np.float64)
        assert 10 * np.log10(np.sum(y ** 2) / np.sum((y - y1) ** 2)) > 100.0


def test_lint_names_a_layer_reading_the_rescale_mul():
    """In the INPUT form a layer reads DQ -> Mul(rescale): accepted by default (bit-exact form), named
    as half-quantized when the lint is told layers must read their DQ directly."""
    merged = one_engine_graph(bucket_graphs(TrtInt8Target(), float_graph()))
    assert lint(merged, LintRules()) == []
    found = {(v.node, v.rule.value) for v in lint(merged, LintRules(rescale_before_layers=False))}
    assert found == {("conv", "both-inputs"), ("linear", "both-inputs")}
