"""SmoothQuant: float numerics unchanged for every fold target; int8 error drops on an outlier channel."""

from __future__ import annotations

import numpy as np
import pytest
from graphs import save_with_external_data
from onnx import TensorProto, helper, numpy_helper

from qcompile.evaluation.metrics import sqnr_db
from qcompile.graph_io import PASS_KEY, constant_values, load_graph, node_meta, save_graph
from qcompile.pass_manager import PassContext, PassManager
from qcompile.passes.cleanup import NameNodes
from qcompile.passes.infer_shapes import InferShapes
from qcompile.passes.smoothquant import FoldTarget, SmoothQuant, plan_smoothquant
from qcompile.quant import QuantDType, TensorRange, activation_qparams, dequantize, quantize, weight_qparams
from qcompile.runtime import make_session

K, T = 16, 10
OUTLIER = 3  # the input channel that carries values ~40x the others


def _x(seed=0, n=4):
    x = np.random.default_rng(seed).standard_normal((n, T, K)).astype(np.float32)
    x[..., OUTLIER] *= 40
    return x


def _block(extra_outputs=()):
    """x -> LayerNorm -> Q/K/V projections (one shared input); V -> fc1 (+bias) -> fc2; x -> Gemm beside a
    residual Add (so x has a reader that is not smoothed). Covers the three fold targets."""
    rng = np.random.default_rng(1)

    def w(*shape, scale=0.3):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    ln_scale = w(K, scale=1.0) + 1
    ln_scale[OUTLIER] = 30.0  # LayerNorm gains make the outlier channels of transformer blocks
    inits = {"ln_scale": ln_scale, "ln_bias": w(K, scale=0.1), "wq": w(K, K), "wk": w(K, K), "wv": w(K, K),
             "w1": w(K, 24), "b1": w(24, scale=0.1), "w2": w(24, 8), "wg": w(K, K), "bg": w(K, scale=0.1)}
    nodes = [
        helper.make_node("LayerNormalization", ["x", "ln_scale", "ln_bias"], ["h"], "norm", axis=-1),
        helper.make_node("MatMul", ["h", "wq"], ["q"], "to_q"),
        helper.make_node("MatMul", ["h", "wk"], ["k"], "to_k"),
        helper.make_node("MatMul", ["h", "wv"], ["v"], "to_v"),
        helper.make_node("MatMul", ["v", "w1"], ["f1"], "fc1"),
        helper.make_node("Add", ["f1", "b1"], ["u"], "fc1_bias"),
        helper.make_node("MatMul", ["u", "w2"], ["y2"], "fc2"),
        helper.make_node("Reshape", ["x", "flat_shape"], ["x2d"], "flatten"),
        helper.make_node("Gemm", ["x2d", "wg", "bg"], ["g"], "proj", transB=1),
        helper.make_node("Add", ["g", "x2d"], ["r"], "residual"),
    ]
    inits["flat_shape"] = np.array([-1, K], np.int64)
    outputs = ["q", "k", "y2", "r", *extra_outputs]
    graph = helper.make_graph(nodes, "block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", T, K])],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)


def _save(model, path):
    return save_with_external_data(model, path)  # rewritten weights must not keep pointing at the old file


def _absmax(tmp_path, names=("h", "v", "u", "x2d")):
    """Per-channel max |X| of the MatMul/Gemm inputs, observed on calibration data in onnxruntime."""
    probe = _save(_block(extra_outputs=names), tmp_path / "probe.onnx")
    outs = make_session(probe).run(list(names), {"x": _x(seed=10, n=16)})
    return {n: np.abs(o).reshape(-1, o.shape[-1]).max(axis=0) for n, o in zip(names, outs, strict=True)}


def _smooth(tmp_path, alpha=0.5):
    src = _save(_block(), tmp_path / "src.onnx")
    graph = load_graph(src)
    sq = SmoothQuant(_absmax(tmp_path), alpha)
    ctx = PassContext()
    PassManager([InferShapes(), NameNodes(), sq]).run(graph, ctx)
    return src, graph, sq, ctx.log[-1]


def test_float_outputs_are_unchanged_for_every_fold_target(tmp_path):
    src, graph, sq, result = _smooth(tmp_path)
    assert result.modified and result.detail == "4 groups, 6 layers; 1 layernorm, 2 linear, 1 mul"
    folds = {g.activation: (g.nodes, g.fold) for g in sq.groups}
    assert folds == {"h": (("to_q", "to_k", "to_v"), FoldTarget.LAYER_NORM),  # Q/K/V share one s
                     "v": (("fc1",), FoldTarget.LINEAR),  # to_v's columns (its rows carry h's s)
                     "u": (("fc2",), FoldTarget.LINEAR),  # fc1's weight columns and bias
                     "x2d": (("proj",), FoldTarget.MUL)}  # the residual Add reads x2d too
    # One Mul is new (the graph is re-sorted after inserting it); nothing else is added or removed.
    assert [n.op for n in graph.nodes] == ["LayerNormalization", "Reshape", "MatMul", "MatMul", "MatMul", "Mul",
                                           "MatMul", "Gemm", "Add", "Add", "MatMul"]
    (mul,) = [n for n in graph.nodes if n.op == "Mul"]
    assert node_meta(mul)[PASS_KEY] == "smoothquant" and mul.outputs[0].name == "x2d_smoothed"
    residual = next(n for n in graph.nodes if n.name == "residual")
    assert residual.inputs[1].name == "x2d"  # the unsmoothed reader still reads the original tensor
    out = save_graph(graph, tmp_path / "smoothed.onnx")
    x = _x(seed=3)
    got_all = make_session(out, optimize=False).run(None, {"x": x})
    for got, want in zip(got_all, make_session(src, optimize=False).run(None, {"x": x}), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_scales_follow_the_formula_and_alpha_per_node(tmp_path):
    src = _save(_block(), tmp_path / "src.onnx")
    graph = load_graph(src)
    absmax = _absmax(tmp_path)
    (group,) = plan_smoothquant(graph, absmax, {"fc2": 0.8})  # only fc2 named: only it is smoothed
    w = np.abs(constant_values(graph.tensors()["w2"])).max(axis=1)
    np.testing.assert_allclose(group.scale, absmax["u"] ** 0.8 / w ** 0.2, rtol=1e-5)
    assert group.alpha == 0.8 and group.nodes == ("fc2",)
    # Q/K/V: one s from the max over the three weights' row absmax.
    h = next(g for g in plan_smoothquant(graph, absmax, 0.5) if g.activation == "h")
    wmax = np.max([np.abs(constant_values(graph.tensors()[n])).max(axis=1) for n in ("wq", "wk", "wv")], axis=0)
    np.testing.assert_allclose(h.scale, np.sqrt(absmax["h"] / wmax), rtol=1e-5)
    with pytest.raises(ValueError, match="to_q has 16 input channels"):
        plan_smoothquant(graph, {"h": np.ones(5, np.float32)}, 0.5)


def _int8(a, axis=None):
    """Fake int8: symmetric per tensor (activations) or per output channel along `axis` (weights)."""
    if axis is None:
        qp = activation_qparams(TensorRange(float(a.min()), float(a.max())), QuantDType.INT8, symmetric=True)
        return dequantize(quantize(a, qp), qp)
    qp = weight_qparams(a, axis, QuantDType.INT8)
    return dequantize(quantize(a, qp, symmetric_range=True), qp)


# (activation, weight, the smoothed tensor the layer reads, min SQNR gain in dB with per-channel weights)
CASES = [("h", "wq", "h", 8.0), ("x2d", "wg", "x2d_smoothed", 6.0), ("u", "w2", "u", 3.0)]


@pytest.mark.parametrize("act,weight,smoothed,gain", CASES)
def test_int8_error_of_the_product_drops(tmp_path, act, weight, smoothed, gain):
    """Per-tensor int8 activations x int8 weights, before and after smoothing, on held-out inputs."""
    src, graph, _, _ = _smooth(tmp_path)
    x = _x(seed=5)
    before = make_session(_save(_block(extra_outputs=(act,)), tmp_path / "probe.onnx")).run([act], {"x": x})[0]
    graph.outputs.append(graph.tensors()[smoothed])
    after = make_session(save_graph(graph, tmp_path / "after.onnx")).run([smoothed], {"x": x})[0]
    w_before = constant_values(load_graph(src).tensors()[weight])
    w_after = constant_values(graph.tensors()[weight])
    if weight == "wg":  # Gemm transB=1: [N, K]
        w_before, w_after = w_before.T, w_after.T
    before, after = before.reshape(-1, K if act != "u" else 24), after.reshape(-1, K if act != "u" else 24)
    exact = before @ w_before
    np.testing.assert_allclose(after @ w_after, exact, rtol=1e-4, atol=1e-4 * np.abs(exact).max())
    per_channel = [sqnr_db(exact, _int8(a) @ _int8(w, axis=1)) for a, w in ((before, w_before), (after, w_after))]
    per_tensor = [sqnr_db(exact, _int8(a) @ _int8(w)) for a, w in ((before, w_before), (after, w_after))]
    print(f"{act}: per-channel weights {per_channel[0]:.1f} -> {per_channel[1]:.1f} dB, "
          f"per-tensor weights {per_tensor[0]:.1f} -> {per_tensor[1]:.1f} dB")
    assert per_channel[1] > per_channel[0] + gain
    assert per_tensor[1] > per_tensor[0] + 3.0


def test_build_smoothing_reads_cached_statistics_and_collects_them_again(tmp_path):
    """What `qcompile build --smoothquant` runs: factors from the per-channel statistics a calibration
    cache holds, a smoothed copy of the float model (same function), and its statistics collected again
    from the same recording, where the outlier channel no longer dominates the range."""
    from qcompile.calibration.inputs import InputSet
    from qcompile.calibration.recorder import record_input_set
    from qcompile.calibration.smoothing import smooth
    from qcompile.calibration.stats import collect_stats

    graph = load_graph(_save(_block(), tmp_path / "raw.onnx"))
    PassManager([InferShapes()]).run(graph, PassContext())
    src = save_graph(graph, tmp_path / "src.onnx")
    recording = record_input_set(InputSet({"x": _x(seed=10, n=16)}, None), tmp_path / "rec", {})

    def inputs_of_linears(g):
        return sorted({n.inputs[0].name for n in g.nodes if n.op in ("MatMul", "Gemm")})

    table = collect_stats(src, load_graph(src), recording, names=inputs_of_linears(load_graph(src)))
    result = smooth(src, ["to_q", "to_k", "to_v", "fc1", "fc2", "proj"], table, recording, 0.5, tmp_path,
                    inputs_of_linears)
    assert {g.fold for g in result.groups} == {FoldTarget.LAYER_NORM, FoldTarget.LINEAR, FoldTarget.MUL}
    x = _x(seed=3)
    for a, b in zip(make_session(src).run(None, {"x": x}), make_session(result.path).run(None, {"x": x}),
                    strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)
    before, after = table.tensors["h"].chan_absmax.max(axis=0), result.table.tensors["h"].chan_absmax.max(axis=0)
    assert after[OUTLIER] < 0.5 * before[OUTLIER]
    assert after.max() / np.median(after) < 0.5 * before.max() / np.median(before)  # ranges evened out
    assert "x2d_smoothed" in result.table.tensors  # the inserted Mul's output has statistics of its own
