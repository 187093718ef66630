"""Attention units: small graphs in every exported form, and a count on every tiny transformer export."""

from __future__ import annotations

import numpy as np
import pytest
from graphs import canonical_export
from onnx import TensorProto, helper, numpy_helper

from qcompile.graph_io import load_graph, node_meta, save_graph
from qcompile.models.source import resolve_model
from qcompile.pass_manager import PassContext, PassManager
from qcompile.passes.cleanup import NameNodes
from qcompile.passes.fuse_attention import AttentionUnit, FuseAttention, find_attention
from qcompile.passes.infer_shapes import InferShapes
from qcompile.rewrite import FUSED_KEY, ROLE_KEY
from qcompile.runtime import make_session

B, H, L, D = 2, 2, 6, 4
SQRT_SCALE = float(D ** -0.25)


def _vi(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _model(nodes, inputs, inits=None, opset=20):
    graph = helper.make_graph(nodes, "attn", [_vi(n, s) for n, s in inputs], [_vi("y", None)],
                              [numpy_helper.from_array(v, k) for k, v in (inits or {}).items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


def _dynamo_sdpa():
    """torch's SDPA decomposition: sqrt(scale) on Q and on K^T, then MatMul/Softmax/MatMul."""
    nodes = [
        helper.make_node("Transpose", ["k"], ["kt"], "k_transpose", perm=[0, 1, 3, 2]),
        helper.make_node("Mul", ["q", "s"], ["qs"], "q_scale"),
        helper.make_node("Mul", ["kt", "s"], ["ks"], "k_scale"),
        helper.make_node("MatMul", ["qs", "ks"], ["scores"], "qk"),
        helper.make_node("Softmax", ["scores"], ["probs"], "softmax", axis=-1),
        helper.make_node("MatMul", ["probs", "v"], ["y"], "av"),
    ]
    qkv = [(n, ["B", H, L, D]) for n in "qkv"]
    return _model(nodes, qkv, {"s": np.array([SQRT_SCALE], np.float32)})


def _masked_with_guard():
    """Scale after Q·K^T (a Div), an additive mask input and torch's NaN guard after the Softmax."""
    nodes = [
        helper.make_node("MatMul", ["q", "kt"], ["scores"], "qk"),
        helper.make_node("Div", ["scores", "sqrt_d"], ["scaled"], "scale"),
        helper.make_node("Add", ["scaled", "mask"], ["masked"], "mask_add"),
        helper.make_node("Softmax", ["masked"], ["probs"], "softmax", axis=3),
        helper.make_node("IsNaN", ["probs"], ["nan"], "isnan"),
        helper.make_node("Where", ["nan", "zero", "probs"], ["safe"], "where"),
        helper.make_node("MatMul", ["safe", "v"], ["y"], "av"),
    ]
    inputs = [("q", ["B", H, L, D]), ("kt", ["B", H, D, L]), ("v", ["B", H, L, D]), ("mask", ["B", 1, L, L])]
    return _model(nodes, inputs, {"sqrt_d": np.array(np.sqrt(D), np.float32), "zero": np.array(0, np.float32)})


def _not_attention():
    """A Softmax over axis 1 and a Softmax feeding a constant-weight MatMul (a classifier head)."""
    w = np.random.default_rng(0).standard_normal((L, 3)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["q", "kt"], ["scores"], "qk"),
        helper.make_node("Softmax", ["scores"], ["p1"], "softmax_axis1", axis=1),
        helper.make_node("MatMul", ["p1", "v"], ["o1"], "av"),
        helper.make_node("Softmax", ["o1"], ["p2"], "softmax_head", axis=-1),
        helper.make_node("MatMul", ["p2", "w"], ["y"], "head"),
    ]
    inputs = [("q", ["B", H, L, D]), ("kt", ["B", H, D, L]), ("v", ["B", H, L, L])]
    return _model(nodes, inputs, {"w": w})


def _feeds(model, seed=0):
    rng = np.random.default_rng(seed)
    dims = {"B": B}
    return {i.name: rng.standard_normal([dims.get(d.dim_param, d.dim_value) for d in i.type.tensor_type.shape.dim])
            .astype(np.float32) for i in model.graph.input}


def _annotate(model, tmp_path):
    tmp_path.mkdir(parents=True, exist_ok=True)
    src = tmp_path / "src.onnx"
    src.write_bytes(model.SerializeToString())
    graph = load_graph(src)
    ctx = PassContext()
    PassManager([InferShapes(), NameNodes(), FuseAttention()]).run(graph, ctx)
    feeds = _feeds(model)
    got = make_session(save_graph(graph, tmp_path / "out.onnx")).run(None, feeds)[0]
    np.testing.assert_array_equal(got, make_session(src).run(None, feeds)[0])  # annotation only
    return graph, ctx.log[-1]


def _roles(graph):
    return {n.name: (node_meta(n).get(FUSED_KEY), node_meta(n).get(ROLE_KEY)) for n in graph.nodes}


def test_dynamo_sdpa_is_one_unit(tmp_path):
    graph, result = _annotate(_dynamo_sdpa(), tmp_path)
    assert result.modified and result.detail == "1 attention units"
    assert [n.op for n in graph.nodes] == ["Transpose", "Mul", "Mul", "MatMul", "Softmax", "MatMul"]
    unit = "attention:0"
    assert _roles(graph) == {"k_transpose": (None, None), "q_scale": (unit, "scale"), "k_scale": (unit, "scale"),
                             "qk": (unit, "qk_matmul"), "softmax": (unit, "softmax"), "av": (unit, "av_matmul")}
    assert find_attention(graph) == [AttentionUnit(0, "qk", "softmax", "av", scale=("q_scale", "k_scale"),
                                                   query="qs", key="ks", value="v", output="y")]
    assert not FuseAttention().run(graph, PassContext()).modified  # idempotent
    assert _roles(load_graph(tmp_path / "out.onnx")) == _roles(graph)  # the marks survive save and load


def test_scores_scale_mask_and_nan_guard_belong_to_the_unit(tmp_path):
    graph, result = _annotate(_masked_with_guard(), tmp_path)
    assert result.modified
    assert [n.op for n in graph.nodes] == ["MatMul", "Div", "Add", "Softmax", "IsNaN", "Where", "MatMul"]
    (unit,) = find_attention(graph)
    assert (unit.scale, unit.mask, unit.guard) == (("scale",), ("mask_add",), ("isnan", "where"))
    assert unit.nodes == ("scale", "qk", "mask_add", "softmax", "isnan", "where", "av")  # grouped by role
    assert {role for _, role in _roles(graph).values()} == {"qk_matmul", "scale", "mask", "softmax", "guard",
                                                            "av_matmul"}


def test_softmax_elsewhere_is_not_attention_and_stale_marks_are_cleared(tmp_path):
    graph, result = _annotate(_not_attention(), tmp_path / "a")
    assert not result.modified and find_attention(graph) == []
    assert all(v == (None, None) for v in _roles(graph).values())
    # A unit that stops matching (V became a constant) loses its marks on the next run.
    graph, _ = _annotate(_dynamo_sdpa(), tmp_path / "b")
    av = next(n for n in graph.nodes if n.name == "av")
    av.inputs[1] = graph.tensors()["s"]
    result = FuseAttention().run(graph, PassContext())
    assert result.modified and result.detail == "0 attention units"
    assert all(v == (None, None) for v in _roles(graph).values())


# --- real exports ---------------------------------------------------------------------------------
# One unit per attention module (diffusers Attention/FluxAttention, transformers CLIPAttention);
# SD3's joint attention is one SDPA over image and text tokens together, so one unit per block.
EXPECTED = {"tiny-sd-unet": 8, "tiny-dit": 2, "tiny-sd3": 3, "tiny-flux": 2, "tiny-clip-text": 2}


@pytest.mark.parametrize("name,exporters", [*(pytest.param(n, ("dynamo",), id=n) for n in EXPECTED),
                                            pytest.param("tiny-sd-unet", ("legacy",), id="tiny-sd-unet-legacy")])
def test_every_attention_of_the_tiny_exports(name, exporters, tmp_path_factory):
    graph = load_graph(canonical_export(name, tmp_path_factory, exporters))
    modules = [m for m in resolve_model(f"builtin:{name}").module.modules() if type(m).__name__.endswith("Attention")]
    ctx = PassContext()
    PassManager([NameNodes(), FuseAttention()]).run(graph, ctx)
    units = find_attention(graph)
    assert len(units) == EXPECTED[name] == len(modules) == sum(n.op == "Softmax" for n in graph.nodes)
    assert ctx.log[-1].modified
    # Both exporters put the softmax scale on Q and on K (sqrt each): ModelOpt's matcher looks after Q·K^T.
    assert all(len(u.scale) == 2 for u in units)
    nodes = {n.name: n for n in graph.nodes}
    for unit in units:
        assert nodes[unit.qk_matmul].op == nodes[unit.av_matmul].op == "MatMul"
        assert all(node_meta(nodes[n])[FUSED_KEY] == unit.unit_id for n in unit.nodes)
