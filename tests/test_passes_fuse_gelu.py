"""Decomposed GELU (erf and tanh forms) -> ONNX Gelu with `approximate`."""

from __future__ import annotations

import math

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from qcompile.graph_io import PASS_KEY, load_graph, node_meta, save_graph
from qcompile.pass_manager import PassContext, PassManager
from qcompile.passes.fuse_gelu import FuseGelu
from qcompile.runtime import make_session

RTOL, ATOL = 1e-5, 1e-6
SHAPE = (2, 7, 16)
CONSTS = {"sqrt2": np.float32(math.sqrt(2)), "inv_sqrt2": np.float32(1 / math.sqrt(2)), "one": np.float32(1),
          "half": np.float32(0.5), "three": np.float32(3), "cubic": np.float32(0.044715),
          "sqrt_2_pi": np.float32(math.sqrt(2 / math.pi))}


def _model(nodes, opset=20, inputs=("x",)):
    used = {i for n in nodes for i in n.input}
    graph = helper.make_graph(nodes, "gelu", [helper.make_tensor_value_info(i, TensorProto.FLOAT, ["N", 7, 16])
                                              for i in inputs],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(v, k) for k, v in CONSTS.items() if k in used])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


def _erf_div(out="y"):
    """(x * (1 + erf(x / sqrt2))) * 0.5: torch's legacy export of F.gelu."""
    return [helper.make_node("Div", ["x", "sqrt2"], ["a"], "div"),
            helper.make_node("Erf", ["a"], ["e"], "erf"),
            helper.make_node("Add", ["e", "one"], ["e1"], "add_one"),
            helper.make_node("Mul", ["x", "e1"], ["xe"], "mul_x"),
            helper.make_node("Mul", ["xe", "half"], [out], "mul_half")]


def _erf_mul():
    """(0.5 * x) * (1 + erf(x * 0.7071)): a hand-written association."""
    return [helper.make_node("Mul", ["x", "inv_sqrt2"], ["a"], "scale"),
            helper.make_node("Erf", ["a"], ["e"], "erf"),
            helper.make_node("Add", ["one", "e"], ["e1"], "add_one"),
            helper.make_node("Mul", ["half", "x"], ["hx"], "half_x"),
            helper.make_node("Mul", ["hx", "e1"], ["y"], "product")]


def _tanh(cube_by_mul=False):
    """0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3))): GELU(approximate='tanh')."""
    cube = [helper.make_node("Pow", ["x", "three"], ["x3"], "cube")]
    if cube_by_mul:
        cube = [helper.make_node("Mul", ["x", "x"], ["x2"], "square"),
                helper.make_node("Mul", ["x2", "x"], ["x3"], "cube")]
    return [*cube,
            helper.make_node("Mul", ["x3", "cubic"], ["c"], "mul_cubic"),
            helper.make_node("Add", ["x", "c"], ["inner"], "add_inner"),
            helper.make_node("Mul", ["inner", "sqrt_2_pi"], ["arg"], "mul_k"),
            helper.make_node("Tanh", ["arg"], ["t"], "tanh"),
            helper.make_node("Add", ["t", "one"], ["t1"], "add_one"),
            helper.make_node("Mul", ["t1", "half"], ["ht"], "mul_half"),
            helper.make_node("Mul", ["x", "ht"], ["y"], "mul_x")]


def _apply(model, tmp_path, inputs=("x",)):
    tmp_path.mkdir(parents=True, exist_ok=True)
    src = tmp_path / "src.onnx"
    src.write_bytes(model.SerializeToString())
    graph = load_graph(src)
    ctx = PassContext()
    PassManager([FuseGelu()]).run(graph, ctx)
    rng = np.random.default_rng(0)
    feeds = {i: (rng.standard_normal(SHAPE) * 3).astype(np.float32) for i in inputs}
    # Both run unoptimized: onnxruntime fuses these patterns itself, and we compare the literal graphs.
    want = make_session(src, optimize=False).run(None, feeds)[0]
    got = make_session(save_graph(graph, tmp_path / "out.onnx"), optimize=False).run(None, feeds)[0]
    return graph, ctx.log[-1], got, want


@pytest.mark.parametrize("nodes,last", [(_erf_div(), "mul_half"), (_erf_mul(), "product")])
def test_erf_forms(tmp_path, nodes, last):
    graph, result, got, want = _apply(_model(nodes), tmp_path)
    assert result.modified and result.detail == "1 erf, 0 tanh"
    assert [n.op for n in graph.nodes] == ["Gelu"]
    gelu = graph.nodes[0]
    assert gelu.attrs["approximate"] == "none" and gelu.name == last and gelu.inputs[0].name == "x"
    assert node_meta(gelu)[PASS_KEY] == "fuse-gelu"
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    assert not FuseGelu().run(graph, PassContext()).modified


@pytest.mark.parametrize("cube_by_mul", [False, True])
def test_tanh_form(tmp_path, cube_by_mul):
    graph, result, got, want = _apply(_model(_tanh(cube_by_mul)), tmp_path)
    assert result.modified and result.detail == "0 erf, 1 tanh"
    assert [n.op for n in graph.nodes] == ["Gelu"] and graph.nodes[0].attrs["approximate"] == "tanh"
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def test_geglu_gate_product_stays_outside(tmp_path):
    """hidden * gelu(gate): the Mul by `hidden` is not part of the GELU."""
    nodes = _erf_div(out="g") + [helper.make_node("Mul", ["h", "g"], ["y"], "gate")]
    graph, result, got, want = _apply(_model(nodes, inputs=("x", "h")), tmp_path, inputs=("x", "h"))
    assert result.modified and [n.op for n in graph.nodes] == ["Gelu", "Mul"]
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def test_not_fused_when_a_piece_is_shared_or_the_opset_is_old(tmp_path):
    # erf(x/sqrt2) also read elsewhere: fusing would leave it computed anyway, and change nothing.
    nodes = _erf_div(out="g") + [helper.make_node("Add", ["g", "e"], ["y"], "reuse")]
    graph, result, got, want = _apply(_model(nodes), tmp_path / "shared")
    assert not result.modified and len(graph.nodes) == 6
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    graph, result, _, _ = _apply(_model(_erf_div(), opset=18), tmp_path / "old")
    assert not result.modified and "opset 18" in result.detail
