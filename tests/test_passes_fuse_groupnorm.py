"""GroupNorm units: annotated below opset 21, one GroupNormalization node from 21."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from graphs import canonical_export
from onnx import TensorProto, helper, numpy_helper

from qcompile.graph_io import PASS_KEY, load_graph, module_path, node_meta, save_graph
from qcompile.models.source import resolve_model
from qcompile.pass_manager import PassContext, PassManager
from qcompile.passes.cleanup import NameNodes
from qcompile.passes.fuse_groupnorm import FuseGroupNorm, GroupNormForm, find_groupnorm
from qcompile.passes.infer_shapes import InferShapes
from qcompile.rewrite import FUSED_KEY, ROLE_KEY, unit_members
from qcompile.runtime import make_session

RTOL, ATOL = 1e-5, 1e-6
C, G = 8, 2


def _x(seed=0, shape=(2, C, 4, 4)):
    return (np.random.default_rng(seed).standard_normal(shape) * 3 + 1).astype(np.float32)


def _model(nodes, inits, opset, shape=("N", C, 4, 4)):
    graph = helper.make_graph(nodes, "gn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


def _decomposed(opset, in_scale=1.0, rank=4):
    """What the exporters emit for nn.GroupNorm(G, C), followed by a SiLU's Sigmoid."""
    rng = np.random.default_rng(1)
    affine = (C,) + (1,) * (rank - 2)
    inits = {"group_shape": np.array([0, G, -1], np.int64), "ones": np.full(G, in_scale, np.float32),
             "zeros": np.zeros(G, np.float32), "gamma": rng.standard_normal(affine).astype(np.float32),
             "beta": rng.standard_normal(affine).astype(np.float32)}
    nodes = [
        helper.make_node("Reshape", ["x", "group_shape"], ["grouped"], "norm_reshape"),
        helper.make_node("InstanceNormalization", ["grouped", "ones", "zeros"], ["normed"], "norm_in", epsilon=1e-5),
        helper.make_node("Shape", ["x"], ["x_shape"], "norm_shape"),
        helper.make_node("Reshape", ["normed", "x_shape"], ["restored"], "norm_reshape_back"),
        helper.make_node("Mul", ["restored", "gamma"], ["scaled"], "norm_mul"),
        helper.make_node("Add", ["scaled", "beta"], ["norm_out"], "norm_add"),
        helper.make_node("Sigmoid", ["norm_out"], ["y"], "act"),
    ]
    shape = ("N", C, 4, 4) if rank == 4 else ("N", C, 16)
    return _model(nodes, inits, opset, shape)


def _apply(model, tmp_path, rewrite, x):
    tmp_path.mkdir(parents=True, exist_ok=True)
    src = tmp_path / "src.onnx"
    src.write_bytes(model.SerializeToString())
    graph = load_graph(src)
    ctx = PassContext()
    PassManager([InferShapes(), NameNodes(), rewrite]).run(graph, ctx)
    result = ctx.log[-1]  # the rewrite's own entry: modified and detail
    out = save_graph(graph, tmp_path / "out.onnx")
    want = make_session(src, optimize=False).run(None, {"x": x})[0]
    got = make_session(out, optimize=False).run(None, {"x": x})[0]
    return graph, result, got, want


def test_below_opset_21_the_nodes_stay_and_are_annotated(tmp_path):
    graph, result, got, want = _apply(_decomposed(20), tmp_path, FuseGroupNorm(), _x())
    assert result.modified
    assert [n.op for n in graph.nodes] == ["Reshape", "InstanceNormalization", "Shape", "Reshape", "Mul", "Add",
                                           "Sigmoid"]
    roles = {n.name: node_meta(n).get(ROLE_KEY) for n in graph.nodes}
    assert roles == {"norm_reshape": "reshape_in", "norm_in": "instance_norm", "norm_shape": "shape",
                     "norm_reshape_back": "reshape_out", "norm_mul": "gamma", "norm_add": "beta", "act": None}
    assert {node_meta(n).get(FUSED_KEY) for n in graph.nodes} == {"groupnorm:0", None}
    assert [n.name for n in unit_members(graph, "groupnorm:0")["beta"]] == ["norm_add"]
    (unit,) = find_groupnorm(graph)
    assert (unit.num_groups, unit.channels, unit.input, unit.output) == (G, C, "x", "norm_out")
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    assert not FuseGroupNorm().run(graph, PassContext()).modified  # annotations already there


@pytest.mark.parametrize("rank", [4, 3])
def test_from_opset_21_one_groupnormalization_node(tmp_path, rank):
    x = _x(shape=(2, C, 4, 4) if rank == 4 else (2, C, 16))
    graph, result, got, want = _apply(_decomposed(21, rank=rank), tmp_path, FuseGroupNorm(), x)
    assert result.modified and result.detail == "1 fused into GroupNormalization"
    assert [n.op for n in graph.nodes] == ["GroupNormalization", "Sigmoid"]
    gn = graph.nodes[0]
    assert gn.name == "norm_add" and gn.attrs["num_groups"] == G and node_meta(gn)[PASS_KEY] == "fuse-groupnorm"
    assert gn.inputs[1].shape == (C,) and gn.outputs[0].name == "norm_out"  # output name kept for calibration
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    assert not FuseGroupNorm().run(graph, PassContext()).modified


def test_forced_annotation_at_opset_21_and_unmatched_instance_norm(tmp_path):
    graph, result, _, _ = _apply(_decomposed(21), tmp_path / "a", FuseGroupNorm(GroupNormForm.ANNOTATED), _x())
    assert result.modified and len(graph.nodes) == 7 and "GroupNormalization" not in {n.op for n in graph.nodes}
    # An InstanceNormalization with a real per-group scale is not a plain GroupNorm: untouched.
    graph, result, got, want = _apply(_decomposed(21, in_scale=2.0), tmp_path / "b", FuseGroupNorm(), _x())
    assert not result.modified and len(graph.nodes) == 7 and not find_groupnorm(graph)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


# --- a real export ------------------------------------------------------------------------------
def test_every_groupnorm_of_the_tiny_sd_unet(tmp_path_factory, tmp_path):
    canon = canonical_export("tiny-sd-unet", tmp_path_factory)
    adapter = resolve_model("builtin:tiny-sd-unet")
    modules = [n for n, m in adapter.module.named_modules() if isinstance(m, torch.nn.GroupNorm)]
    graph = load_graph(canon)
    assert graph.opset == 20
    result = PassManager([InferShapes(), NameNodes(), FuseGroupNorm()]).run(graph, PassContext())
    units = find_groupnorm(graph)
    assert result.modified and len(units) == len(modules) == 21
    # Each unit is one torch GroupNorm: all its nodes carry that module's path, one unit per module.
    nodes = {n.name: n for n in graph.nodes}
    unit_paths = [{module_path(nodes[name]) for name, _ in u.roles()} for u in units]
    assert all(len(p) == 1 for p in unit_paths)
    assert sorted(p.pop() for p in unit_paths) == sorted(modules)
    # At opset 21 the same graph fuses into GroupNormalization and the whole UNet gives the same output.
    graph.opset, graph.import_domains = 21, None
    assert FuseGroupNorm().run(graph, PassContext()).modified
    assert sum(n.op == "GroupNormalization" for n in graph.nodes) == 21
    assert not any(n.op == "InstanceNormalization" for n in graph.nodes)
    feeds = adapter.dummy_inputs(batch=2, seed=3)
    want = make_session(canon, optimize=False).run(None, feeds)[0]
    got = make_session(save_graph(graph, tmp_path / "fused.onnx"), optimize=False).run(None, feeds)[0]
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
