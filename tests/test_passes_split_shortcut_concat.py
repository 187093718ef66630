"""Q-Diffusion's shortcut split: Conv(Concat(a, b)) -> Conv(a) + Conv(b), exact in float."""

from __future__ import annotations

import numpy as np
import pytest
from graphs import canonical_export
from onnx import TensorProto, helper, numpy_helper

from qcompile.graph_io import PASS_KEY, constant_values, load_graph, module_path, node_meta, save_graph
from qcompile.models.source import resolve_model
from qcompile.pass_manager import PassContext, PassManager
from qcompile.passes.cleanup import NameNodes
from qcompile.passes.infer_shapes import InferShapes
from qcompile.passes.split_shortcut_concat import SplitShortcutConcat
from qcompile.runtime import make_session

RTOL, ATOL = 1e-5, 1e-6
CHANNELS = (4, 3, 2)
OUT = 6


def _model(parts=2, axis=1, group=1):
    """Concat(parts along `axis`) read by a Conv (bias, padding) and by a Relu, as in an up block."""
    rng = np.random.default_rng(0)
    names = ["deep", "skip", "extra"][:parts]
    cin = sum(CHANNELS[:parts]) if axis == 1 else CHANNELS[0]
    w = rng.standard_normal((OUT, cin // group, 3, 3)).astype(np.float32) * 0.2
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(rng.standard_normal(OUT).astype(np.float32), "b")]
    nodes = [helper.make_node("Concat", names, ["cat"], "cat", axis=axis),
             helper.make_node("Conv", ["cat", "w", "b"], ["y"], "conv_shortcut", pads=[1, 1, 1, 1], group=group),
             helper.make_node("Relu", ["cat"], ["z"], "norm_stand_in")]
    shape = (lambda c: ["N", c, 8, 8]) if axis == 1 else (lambda c: ["N", CHANNELS[0], 8 * c, 8])
    graph = helper.make_graph(nodes, "split", [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape(c))
                                               for n, c in zip(names, CHANNELS, strict=False)],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in ("y", "z")], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)


def _apply(model, tmp_path):
    src = tmp_path / "src.onnx"
    src.write_bytes(model.SerializeToString())
    graph = load_graph(src)
    ctx = PassContext()
    PassManager([InferShapes(), NameNodes(), SplitShortcutConcat()]).run(graph, ctx)
    rng = np.random.default_rng(1)
    feeds = {i.name: (rng.standard_normal([2 if d.dim_param else d.dim_value for d in i.type.tensor_type.shape.dim])
                      * (10.0 if i.name == "skip" else 1.0)).astype(np.float32) for i in model.graph.input}
    want = make_session(src, optimize=False).run(None, feeds)
    got = make_session(save_graph(graph, tmp_path / "out.onnx"), optimize=False).run(None, feeds)
    return graph, ctx.log[-1], got, want


@pytest.mark.parametrize("parts", [2, 3])
def test_conv_on_concat_becomes_a_sum_of_convs(tmp_path, parts):
    graph, result, got, want = _apply(_model(parts), tmp_path)
    assert result.modified and result.detail == "1 convs split"
    assert [n.op for n in graph.nodes] == ["Concat", *["Conv"] * parts, "Relu", *["Add"] * (parts - 1)]
    convs = [n for n in graph.nodes if n.op == "Conv"]
    assert [n.inputs[0].name for n in convs] == ["deep", "skip", "extra"][:parts]  # the Concat is bypassed
    assert [constant_values(n.inputs[1]).shape[1] for n in convs] == list(CHANNELS[:parts])
    assert [len(n.inputs) for n in convs] == [3] + [2] * (parts - 1)  # bias added once
    assert all(node_meta(n)[PASS_KEY] == "split-shortcut-concat" for n in graph.nodes if n.op in ("Conv", "Add"))
    assert graph.outputs[0].inputs[0].op == "Add"  # the output tensor keeps its name, now the sum
    assert [n.op for n in graph.nodes if n.name == "cat"] == ["Concat"]  # still read by the Relu
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=RTOL, atol=ATOL)
    assert not SplitShortcutConcat().run(graph, PassContext()).modified


@pytest.mark.parametrize("kwargs", [{"axis": 2}, {"group": 3}])
def test_spatial_concat_and_grouped_conv_are_left_alone(tmp_path, kwargs):
    graph, result, got, want = _apply(_model(3 if "group" in kwargs else 2, **kwargs), tmp_path)
    assert not result.modified and [n.op for n in graph.nodes] == ["Concat", "Conv", "Relu"]
    np.testing.assert_allclose(got[0], want[0], rtol=RTOL, atol=ATOL)


def test_tiny_sd_unet_up_block_shortcuts(tmp_path_factory, tmp_path):
    """Every up-block resnet concatenates (deep, skip); its conv_shortcut is the Conv that reads the Concat
    (conv1 reads norm1 -> SiLU of it, so there is nothing to split there)."""
    canon = canonical_export("tiny-sd-unet", tmp_path_factory)
    adapter = resolve_model("builtin:tiny-sd-unet")
    shortcuts = sorted(n for n, _ in adapter.module.named_modules()
                       if n.startswith("up_blocks.") and n.endswith(".conv_shortcut"))
    graph = load_graph(canon)
    convs_before = sum(n.op == "Conv" for n in graph.nodes)
    ctx = PassContext()
    PassManager([InferShapes(), NameNodes(), SplitShortcutConcat()]).run(graph, ctx)
    assert ctx.log[-1].detail == f"{len(shortcuts)} convs split" and len(shortcuts) == 4
    new = [n for n in graph.nodes if n.op == "Conv" and node_meta(n).get(PASS_KEY) == "split-shortcut-concat"]
    assert sorted({module_path(n) for n in new}) == shortcuts and len(new) == 2 * len(shortcuts)
    assert sum(n.op == "Conv" for n in graph.nodes) == convs_before + len(shortcuts)
    feeds = adapter.dummy_inputs(batch=2, seed=3)
    want = make_session(canon, optimize=False).run(None, feeds)[0]
    got = make_session(save_graph(graph, tmp_path / "split.onnx"), optimize=False).run(None, feeds)[0]
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
