"""TensorRT Q/DQ placement (passes/plan_explicit.py) and FP8 numerics: levels quantize whole layers
cumulatively, narrow layers and float scopes stay float, skip-Add residuals and FP8 attention get Q/DQ,
every emitted graph lints clean, and the FP8 emulation matches onnxruntime's float8 QuantizeLinear."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_graphsurgeon as gs
import pytest

from qcompile.caps import QuantLevel
from qcompile.errors import UserError
from qcompile.graph_io import MODULE_KEY, copy_graph, node_meta, save_graph
from qcompile.pass_manager import PassContext
from qcompile.passes.insert_qdq import plan_quantization
from qcompile.quant import QuantDType, TensorRange, activation_qparams, dequantize, quantize, weight_qparams
from qcompile.runtime import make_session
from qcompile.target import BucketJob
from qcompile.targets.tensorrt.lint import LintRules, lint
from qcompile.targets.tensorrt.options import TrtOptions, level
from qcompile.targets.tensorrt.target import TrtFp8Target, TrtInt8Target


def block(head: int = 32, width: int = 32) -> gs.Graph:
    """A transformer-ish block: conv_in -> tokens -> to_q/to_k/to_v -> attention -> to_out (+ residual)
    -> ff.net.0 -> ff.net.2 (+ residual), with module paths as the exporter records them."""
    rng = np.random.default_rng(0)
    nodes: list[gs.Node] = []

    def var(name, shape):
        return gs.Variable(name, np.float32, shape)

    def node(op, name, inputs, out_shape, path="", **attrs):
        out = var(f"{name}_out", out_shape)
        n = gs.Node(op, name, attrs, inputs, [out])
        if path:
            node_meta(n)[MODULE_KEY] = path
        nodes.append(n)
        return out

    def linear(name, x, k, n, path):
        w = gs.Constant(f"{name}_w", rng.normal(0, 0.2, (k, n)).astype(np.float32))
        y = node("MatMul", name, [x, w], (1, 64, n), path)
        return node("Add", f"{name}_bias", [y, gs.Constant(f"{name}_b", np.zeros(n, np.float32))], (1, 64, n), path)

    x = var("x", (1, 4, 8, 8))
    h = node("Conv", "conv_in", [x, gs.Constant("cw", rng.normal(0, 0.3, (width, 4, 1, 1)).astype(np.float32))],
             (1, width, 8, 8), "conv_in")
    h = node("Conv", "conv1", [h, gs.Constant("c1", rng.normal(0, 0.1, (width, width, 3, 3)).astype(np.float32))],
             (1, width, 8, 8), "down.conv1", pads=[1, 1, 1, 1])
    flat = node("Reshape", "flatten", [h, gs.Constant("shp", np.array([1, width, 64], np.int64))], (1, width, 64))
    t = node("Transpose", "tokens", [flat], (1, 64, width), perm=[0, 2, 1])
    q = linear("to_q", t, width, head, "attn1.to_q")
    k = linear("to_k", t, width, head, "attn1.to_k")
    v = linear("to_v", t, width, head, "attn1.to_v")
    kt = node("Transpose", "kt", [k], (1, head, 64), perm=[0, 2, 1])
    s = node("MatMul", "qk", [q, kt], (1, 64, 64))
    s = node("Mul", "scale", [s, gs.Constant("sc", np.array(head ** -0.5, np.float32))], (1, 64, 64))
    p = node("Softmax", "softmax", [s], (1, 64, 64), axis=-1)
    a = node("MatMul", "av", [p, v], (1, 64, head))
    o = linear("to_out", a, head, width, "attn1.to_out.0")
    r = node("Add", "attn_residual", [o, t], (1, 64, width))
    f = linear("ff0", r, width, 64, "ff.net.0.proj")
    f = node("Relu", "act", [f], (1, 64, 64))
    f = linear("ff2", f, 64, width, "ff.net.2")
    out = node("Add", "ff_residual", [f, r], (1, 64, width))
    return gs.Graph(nodes=nodes, inputs=[x], outputs=[out], opset=20)


def calibrated(graph: gs.Graph, names, x: np.ndarray, tmp_path) -> dict[str, TensorRange]:
    """Each planned activation's min/max on `x` (the graph run in onnxruntime with them as outputs)."""
    probe = copy_graph(graph)
    tensors = probe.tensors()
    probe.outputs = [tensors[n] for n in names]
    values = make_session(save_graph(probe, tmp_path / "probe.onnx")).run(None, {"x": x})
    return {n: TensorRange(float(v.min()), float(v.max())) for n, v in zip(names, values, strict=True)}


def weighted(plan) -> set[str]:
    return {w.node for w in plan.weights}


@pytest.mark.parametrize("lv,expected", [
    (QuantLevel.CONV, {"conv1"}),
    (QuantLevel.FFN, {"conv1", "ff0", "ff2"}),
    (QuantLevel.QKV, {"conv1", "ff0", "ff2", "to_q", "to_k", "to_v"}),
    (QuantLevel.LINEAR, {"conv1", "ff0", "ff2", "to_q", "to_k", "to_v", "to_out"}),
])
def test_levels_are_cumulative_whole_layers(lv, expected):
    target = TrtInt8Target(TrtOptions(level=lv))
    plan = plan_quantization(block(), target.caps)
    assert weighted(plan) == expected
    assert "conv_in" in plan.excluded  # K = 4 input channels < 16
    layers = {n for n, _ in plan.consumers if n in expected}
    assert layers == expected  # every quantized layer's input is quantized too


def test_residual_adds_quantized_with_their_layers():
    plan = plan_quantization(block(), TrtInt8Target().caps)
    readers = {n: t for n, t in plan.consumers}
    assert readers["attn_residual"] == "tokens_out"  # to_out feeds it, the tokens are the residual
    assert readers["ff_residual"] == "attn_residual_out"
    conv_only = plan_quantization(block(), TrtInt8Target(TrtOptions(level=QuantLevel.CONV)).caps)
    assert "attn_residual" not in {n for n, _ in conv_only.consumers}  # to_out is float there


def test_float_scopes_stay_float():
    plan = plan_quantization(block(), TrtInt8Target().caps, [r"^ff\.net\.2$"])
    assert "ff2" in plan.excluded and "ff2" not in weighted(plan)


@pytest.mark.parametrize("head,quantized", [(32, True), (24, False)])
def test_fp8_attention_when_head_is_multiple_of_16(head, quantized):
    plan = plan_quantization(block(head=head), TrtFp8Target().caps)
    bmm = {(n, t) for n, t in plan.consumers if n in ("qk", "av")}
    if quantized:
        assert bmm == {("qk", "to_q_bias_out"), ("qk", "kt_out"), ("av", "softmax_out"), ("av", "to_v_bias_out")}
    else:
        assert bmm == set() and {"qk", "av"} <= set(plan.excluded)


def test_int8_has_no_attention_level():
    with pytest.raises(UserError, match="trt-level attention"):
        TrtInt8Target(TrtOptions(level=QuantLevel.ATTENTION))


def test_level_option_accepts_the_demo_numbers():
    assert level("2.5") is QuantLevel.QKV and level("3") is QuantLevel.LINEAR and level("ffn") is QuantLevel.FFN
    with pytest.raises(UserError, match="--trt-level 5"):
        level("5")


@pytest.mark.parametrize("target,min_sqnr", [(TrtInt8Target(), 30.0), (TrtFp8Target(), 21.0)], ids=["int8", "fp8"])
def test_compiled_graph_lints_clean_and_runs(tmp_path, target, min_sqnr):
    """Measured on this block: int8 33.1 dB; fp8 23.3 dB (E4M3 keeps 3 mantissa bits, about 31 dB per
    quantization point, and FP8 also quantizes the attention's Q, K, V and softmax output)."""
    graph = block()
    plan = plan_quantization(graph, target.caps)
    x = np.random.default_rng(2).normal(0, 1, (1, 4, 8, 8)).astype(np.float32)
    ranges = calibrated(graph, plan.activations, x, tmp_path)
    compiled = target.compile_bucket(copy_graph(graph), BucketJob(0, plan, ranges, None), PassContext()).graph
    assert lint(compiled, LintRules(float_layers=frozenset(plan.excluded))) == []
    assert compiled.opset >= 19
    zeros = [n.inputs[2] for n in compiled.nodes if n.op in ("QuantizeLinear", "DequantizeLinear")]
    assert {np.dtype(z.dtype).name for z in zeros} == {"int8" if target.dtype is QuantDType.INT8 else "float8_e4m3fn"}
    ref = make_session(save_graph(graph, tmp_path / "f.onnx")).run(None, {"x": x})[0]
    got = make_session(save_graph(compiled, tmp_path / "q.onnx"), optimize=False).run(None, {"x": x})[0]
    sqnr = 10 * np.log10(np.sum(ref ** 2) / np.sum((ref - got) ** 2))
    assert sqnr > min_sqnr, sqnr


def test_fp8_emulation_matches_onnxruntime(tmp_path):
    """quant.quantize for FLOAT8E4M3FN (ml_dtypes) is bit for bit onnxruntime's float8 QuantizeLinear,
    saturation and ties included; dequantize likewise."""
    dtype = QuantDType.FLOAT8E4M3FN
    qp = activation_qparams(TensorRange(-2.0, 3.0), dtype, symmetric=True)
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.normal(0, 2, 4000), rng.uniform(-10, 10, 1000), [1e9, -1e9, 0.0]]).astype(np.float32)
    xv = gs.Variable("x", np.float32, x.shape)
    qv = gs.Variable("q", dtype.numpy, x.shape)
    dv = gs.Variable("d", np.float32, x.shape)
    s, z = gs.Constant("s", qp.scale), gs.Constant("z", qp.zero_point)
    nodes = [gs.Node("QuantizeLinear", "Q", {}, [xv, s, z], [qv]),
             gs.Node("DequantizeLinear", "DQ", {}, [qv, s, z], [dv])]
    g = gs.Graph(nodes=nodes, inputs=[xv], outputs=[qv, dv], opset=19)
    q_ort, d_ort = make_session(save_graph(g, tmp_path / "q.onnx"), optimize=False).run(None, {"x": x})
    q = quantize(x, qp)
    assert q.dtype == ml_dtypes.float8_e4m3fn
    np.testing.assert_array_equal(q.view(np.uint8), q_ort.view(np.uint8))
    np.testing.assert_array_equal(dequantize(q, qp), d_ort)
    assert float(q.astype(np.float32).max()) == 448.0  # saturated, not NaN
    w = rng.normal(0, 1, (8, 16)).astype(np.float32)
    wq = weight_qparams(w, 0, dtype)
    err = dequantize(quantize(w, wq, symmetric_range=True), wq) - w
    assert 10 * np.log10(np.sum(w ** 2) / np.sum(err ** 2)) > 25  # E4M3: 3 mantissa bits, ~31 dB


def test_decomposed_gelu_fused_before_qdq(tmp_path):
    """A legacy export's x*0.5*(1+erf(x/sqrt2)) between two linears becomes one Gelu; the planned
    tensors (the second linear's input is the GELU's output) survive, and the numerics are kept."""
    rng = np.random.default_rng(4)
    x = gs.Variable("x", np.float32, (1, 64, 32))

    def v(name, shape=(1, 64, 32)):
        return gs.Variable(name, np.float32, shape)

    h, d, e, p, m, g, y = v("h"), v("d"), v("e"), v("p"), v("m"), v("g"), v("y")
    nodes = [gs.Node("MatMul", "ff0", {}, [x, gs.Constant("w0", rng.normal(0, 0.2, (32, 32)).astype(np.float32))], [h]),
             gs.Node("Div", "div", {}, [h, gs.Constant("r2", np.array(np.sqrt(2), np.float32))], [d]),
             gs.Node("Erf", "erf", {}, [d], [e]),
             gs.Node("Add", "one", {}, [e, gs.Constant("c1", np.array(1, np.float32))], [p]),
             gs.Node("Mul", "mx", {}, [h, p], [m]),
             gs.Node("Mul", "half", {}, [m, gs.Constant("c5", np.array(0.5, np.float32))], [g]),
             gs.Node("MatMul", "ff2", {}, [g, gs.Constant("w2", rng.normal(0, 0.2, (32, 32)).astype(np.float32))], [y])]
    graph = gs.Graph(nodes=nodes, inputs=[x], outputs=[y], opset=20)
    target = TrtInt8Target()
    plan = plan_quantization(graph, target.caps)
    assert set(plan.activations) == {"x", "g"}
    xv = rng.normal(0, 1, (1, 64, 32)).astype(np.float32)
    compiled = target.compile_bucket(copy_graph(graph), BucketJob(0, plan, calibrated(graph, plan.activations, xv,
                                                                                       tmp_path), None),
                                     PassContext()).graph
    ops = [n.op for n in compiled.nodes]
    assert "Gelu" in ops and "Erf" not in ops
    assert lint(compiled, LintRules()) == []
    ref = make_session(save_graph(graph, tmp_path / "f.onnx")).run(None, {"x": xv})[0]
    got = make_session(save_graph(compiled, tmp_path / "q.onnx"), optimize=False).run(None, {"x": xv})[0]
    assert 10 * np.log10(np.sum(ref ** 2) / np.sum((ref - got) ** 2)) > 30.0
