"""FuseRMSNorm: every exported spelling of RMSNorm becomes one RMSNormalization computing the same
values; a norm whose intermediates are read elsewhere is left alone."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from graphs import save_with_external_data
from onnx import TensorProto, helper, numpy_helper

from qcompile.graph_io import load_graph, save_graph
from qcompile.pass_manager import PassContext, PassManager
from qcompile.passes.fuse_rmsnorm import FuseRMSNorm
from qcompile.passes.infer_shapes import InferShapes
from qcompile.runtime import make_session

SHAPE = [2, 4, 6, 8]


def _rmsnorm(square: str, divide: str, weight: bool, extra_output: str | None = None) -> onnx.ModelProto:
    """x -> Relu -> RMSNorm (Pow|Mul square; Reciprocal+Mul|Div) [-> Mul(weight)] -> Sigmoid."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.float32(2), "two"), numpy_helper.from_array(np.float32(1e-6), "eps"),
             numpy_helper.from_array(np.array([-1], np.int64), "axes"),
             numpy_helper.from_array((1 + 0.1 * rng.standard_normal(SHAPE[-1])).astype(np.float32), "w")]
    nodes = [helper.make_node("Relu", ["x"], ["h"], "relu"),
             helper.make_node("Pow", ["h", "two"], ["sq"], "pow") if square == "pow"
             else helper.make_node("Mul", ["h", "h"], ["sq"], "square"),
             helper.make_node("ReduceMean", ["sq", "axes"], ["ms"], "mean", keepdims=1),
             helper.make_node("Add", ["ms", "eps"], ["ms_eps"], "add_eps"),
             helper.make_node("Sqrt", ["ms_eps"], ["rms"], "sqrt")]
    if divide == "reciprocal":
        nodes += [helper.make_node("Reciprocal", ["rms"], ["inv"], "recip"),
                  helper.make_node("Mul", ["h", "inv"], ["normed"], "scale_x")]
    else:
        nodes += [helper.make_node("Div", ["h", "rms"], ["normed"], "divide")]
    last = "normed"
    if weight:
        nodes.append(helper.make_node("Mul", ["normed", "w"], ["weighted"], "weight"))
        last = "weighted"
    nodes.append(helper.make_node("Sigmoid", [last], ["y"], "sigmoid"))
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, SHAPE)]
    if extra_output:
        outputs.append(helper.make_tensor_value_info(extra_output, TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "rmsnorm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, SHAPE)],
                              outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)


def _fuse(model: onnx.ModelProto, tmp_path):
    src = save_with_external_data(model, tmp_path / "src.onnx")
    graph = load_graph(src)
    PassManager([InferShapes(), FuseRMSNorm()]).run(graph, PassContext())
    return src, graph, save_graph(graph, tmp_path / "fused.onnx")


@pytest.mark.parametrize(("square", "divide", "weight"), [("pow", "reciprocal", True), ("mul", "div", False),
                                                          ("pow", "div", True)])
def test_every_spelling_fuses_to_the_same_values(tmp_path, square, divide, weight):
    src, graph, fused = _fuse(_rmsnorm(square, divide, weight), tmp_path)
    ops = [n.op for n in graph.nodes]
    # [1, 2 * 4 * 6, 8] around the norm: HTP's 8-bit RMSNormalization is wrong on other leading shapes (the pass)
    assert ops == ["Relu", "Reshape", "RMSNormalization", "Reshape", "Sigmoid"] and graph.opset == 23
    norm = graph.nodes[2]
    assert norm.attrs["axis"] == -1 and norm.attrs["epsilon"] == pytest.approx(1e-6)
    assert norm.inputs[0].shape == [1, 48, 8]
    assert norm.outputs[0].name == ("weighted" if weight else "normed")  # calibrated ranges still apply
    x = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)
    np.testing.assert_allclose(make_session(fused).run(None, {"x": x})[0], make_session(src).run(None, {"x": x})[0],
                               rtol=1e-5, atol=1e-6)


def test_a_norm_whose_intermediate_is_an_output_stays(tmp_path):
    _, graph, _ = _fuse(_rmsnorm("pow", "reciprocal", True, extra_output="ms"), tmp_path)
    assert "RMSNormalization" not in {n.op for n in graph.nodes} and graph.opset == 20


def test_a_normalized_output_keeps_its_weight_multiply(tmp_path):
    """The unweighted result is a graph output: the norm fuses up to it and the weight stays a Mul."""
    src, graph, fused = _fuse(_rmsnorm("pow", "reciprocal", True, extra_output="normed"), tmp_path)
    assert [n.op for n in graph.nodes] == ["Relu", "RMSNormalization", "Mul", "Sigmoid"]
    x = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)
    for got, want in zip(make_session(fused).run(None, {"x": x}), make_session(src).run(None, {"x": x}), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
