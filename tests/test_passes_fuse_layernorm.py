"""Decomposed LayerNorm -> LayerNormalization; already-fused graphs and RMSNorm are left alone."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from qcompile.graph_io import PASS_KEY, load_graph, node_meta, save_graph
from qcompile.pass_manager import PassContext, PassManager
from qcompile.passes.cleanup import NameNodes
from qcompile.passes.fuse_layernorm import FuseLayerNorm
from qcompile.passes.infer_shapes import InferShapes
from qcompile.runtime import make_session

RTOL, ATOL = 1e-5, 1e-6
SHAPE = (2, 5, 16)


def _model(nodes, inits, opset):
    graph = helper.make_graph(nodes, "ln", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


def _reduce(inp, out, name, opset, axes):
    if opset >= 18:
        return helper.make_node("ReduceMean", [inp, "axes"], [out], name)
    return helper.make_node("ReduceMean", [inp], [out], name, axes=axes)


def _decomposed(opset=18, axes=(-1,), squared_by_mul=False, reciprocal=False, affine=True):
    """The legacy exporter's spelling of nn.LayerNorm, and its variants; a Relu reads the result."""
    rng = np.random.default_rng(0)
    norm_shape = SHAPE[len(SHAPE) - len(axes):]
    inits = {"two": np.float32(2.0), "eps": np.float32(1e-5), "axes": np.array(axes, np.int64),
             "gamma": rng.standard_normal(norm_shape).astype(np.float32),
             "beta": rng.standard_normal(norm_shape).astype(np.float32)}
    nodes = [
        _reduce("x", "mean", "mean", opset, list(axes)),
        helper.make_node("Sub", ["x", "mean"], ["d"], "sub"),
        helper.make_node("Mul", ["d", "d"], ["sq"], "square") if squared_by_mul
        else helper.make_node("Pow", ["d", "two"], ["sq"], "square"),
        _reduce("sq", "var", "var", opset, list(axes)),
        helper.make_node("Add", ["var", "eps"], ["var_eps"], "add_eps"),
        helper.make_node("Sqrt", ["var_eps"], ["std"], "sqrt"),
    ]
    if reciprocal:
        nodes += [helper.make_node("Reciprocal", ["std"], ["inv"], "recip"),
                  helper.make_node("Mul", ["d", "inv"], ["n"], "normalize")]
    else:
        nodes.append(helper.make_node("Div", ["d", "std"], ["n"], "normalize"))
    last = "n"
    if affine:
        nodes += [helper.make_node("Mul", ["n", "gamma"], ["scaled"], "gamma_mul"),
                  helper.make_node("Add", ["scaled", "beta"], ["ln_out"], "beta_add")]
        last = "ln_out"
    nodes.append(helper.make_node("Relu", [last], ["y"], "relu"))
    return _model(nodes, inits, opset)


def _apply(model, tmp_path):
    tmp_path.mkdir(parents=True, exist_ok=True)
    src = tmp_path / "src.onnx"
    src.write_bytes(model.SerializeToString())
    graph = load_graph(src)
    ctx = PassContext()
    PassManager([InferShapes(), NameNodes(), FuseLayerNorm()]).run(graph, ctx)
    x = (np.random.default_rng(1).standard_normal(SHAPE) * 4 + 2).astype(np.float32)
    # Both run unoptimized: onnxruntime fuses these patterns itself, and we compare the literal graphs.
    want = make_session(src, optimize=False).run(None, {"x": x})[0]
    got = make_session(save_graph(graph, tmp_path / "out.onnx"), optimize=False).run(None, {"x": x})[0]
    return graph, ctx.log[-1], got, want


def test_legacy_spelling_becomes_one_layernormalization(tmp_path):
    graph, result, got, want = _apply(_decomposed(), tmp_path)
    assert result.modified and result.detail == "1 fused"
    assert [n.op for n in graph.nodes] == ["LayerNormalization", "Relu"]
    ln = graph.nodes[0]
    assert ln.name == "beta_add" and ln.outputs[0].name == "ln_out" and node_meta(ln)[PASS_KEY] == "fuse-layernorm"
    assert ln.attrs["axis"] == -1 and ln.attrs["epsilon"] == pytest.approx(1e-5)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    assert not FuseLayerNorm().run(graph, PassContext()).modified


@pytest.mark.parametrize("variant", [
    {"opset": 17, "axes": (-2, -1), "squared_by_mul": True},  # axes attribute, two normalized axes
    {"reciprocal": True, "affine": False},  # x * 1/sqrt(.), elementwise_affine=False
])
def test_variants(tmp_path, variant):
    graph, result, got, want = _apply(_decomposed(**variant), tmp_path)
    assert result.modified
    assert [n.op for n in graph.nodes] == ["LayerNormalization", "Relu"]
    assert graph.nodes[0].attrs["axis"] == -len(variant.get("axes", (-1,)))
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def test_already_fused_and_rmsnorm_are_left_alone(tmp_path):
    rng = np.random.default_rng(2)
    fused = _model([helper.make_node("LayerNormalization", ["x", "g", "b"], ["ln"], "ln", axis=-1),
                    helper.make_node("Relu", ["ln"], ["y"], "relu")],
                   {"g": rng.standard_normal(16).astype(np.float32), "b": np.zeros(16, np.float32)}, 20)
    graph, result, got, want = _apply(fused, tmp_path / "fused")
    assert not result.modified and [n.op for n in graph.nodes] == ["LayerNormalization", "Relu"]
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    # SD3/Flux's RMSNorm: x * 1/sqrt(mean(x^2) + eps) has no mean subtraction: not a LayerNorm.
    rms = _model([helper.make_node("Pow", ["x", "two"], ["sq"], "square"),
                  helper.make_node("ReduceMean", ["sq", "axes"], ["ms"], "mean"),
                  helper.make_node("Add", ["ms", "eps"], ["ms_eps"], "add_eps"),
                  helper.make_node("Sqrt", ["ms_eps"], ["rms"], "sqrt"),
                  helper.make_node("Reciprocal", ["rms"], ["inv"], "recip"),
                  helper.make_node("Mul", ["x", "inv"], ["y"], "normalize")],
                 {"two": np.float32(2), "eps": np.float32(1e-6), "axes": np.array([-1], np.int64)}, 20)
    graph, result, _, _ = _apply(rms, tmp_path / "rms")
    assert not result.modified and len(graph.nodes) == 6


def test_below_opset_17_nothing_is_fused(tmp_path):
    graph, result, _, _ = _apply(_decomposed(opset=16), tmp_path)
    assert not result.modified and "opset 16" in result.detail and len(graph.nodes) == 10
