"""The matching layer itself (qcompile/rewrite.py): a rule matches and rewrites, a check rejects with its
reason (counted and logged), the replacement carries the rule's name, a node joins one match at most,
and the rewritten graph computes the same values in onnxruntime."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from qcompile.graph_io import MODULE_KEY, PASS_KEY, constant_values, load_graph, node_meta, save_graph
from qcompile.rewrite import (
    Edit,
    GraphView,
    Pattern,
    Rule,
    apply,
    find,
    per_channel,
    producer,
    require,
    subgraph,
    weight_axis,
)
from qcompile.runtime import make_session

RTOL, ATOL = 1e-5, 1e-6
SHAPE = [2, 3, 4]


@dataclass(frozen=True)
class DivMatch:
    div: gs.Node
    divisor: np.ndarray

    @property
    def nodes(self) -> tuple[gs.Node, ...]:
        return (self.div,)


class DivByConstantAsMul(Rule[DivMatch]):
    """x / c -> x * (1 / c) for a constant c with no zero."""

    name = "div-as-mul"
    anchors = frozenset({"Div"})

    def match(self, anchor: gs.Node, view: GraphView) -> DivMatch:
        divisor = constant_values(anchor.inputs[1])
        require(divisor is not None, "the divisor is not a constant")
        return DivMatch(anchor, divisor)

    def check(self, match: DivMatch, view: GraphView) -> str | None:
        return "the divisor has a zero" if np.any(match.divisor == 0) else None

    def rewrite(self, match: DivMatch, edit: Edit) -> None:
        div = match.div
        inverse = gs.Constant(f"{div.name}_inverse", np.asarray(1.0 / match.divisor, np.float32))
        edit.add("Mul", div.name, [div.inputs[0], inverse], [div.outputs[0]], like=div)


@dataclass(frozen=True)
class ChainMatch:
    nodes: tuple[gs.Node, ...]


class ReluChain(Pattern[ChainMatch]):
    """Relu -> Relu: both nodes belong to the match, so the second Relu never anchors another one."""

    name = "relu-chain"
    anchors = frozenset({"Relu"})

    def match(self, anchor: gs.Node, view: GraphView) -> ChainMatch:
        second = view.only_consumer(anchor.outputs[0], "Relu")
        require(second is not None, "no second Relu")
        return ChainMatch((anchor, second))


def _divisions(path, zero_divisor: bool = False):
    """x / 4 -> Relu -> / (activation y) -> / c, with c = [2, 0.5, 8, 1] (or a zero in it)."""
    c = np.array([2.0, 0.5, 0.0 if zero_divisor else 8.0, 1.0], np.float32)
    nodes = [helper.make_node("Div", ["x", "four"], ["a"], "div_four"),
             helper.make_node("Relu", ["a"], ["r"], "relu"),
             helper.make_node("Div", ["r", "y"], ["b"], "div_y"),
             helper.make_node("Div", ["b", "c"], ["out"], "div_c")]
    graph = helper.make_graph(nodes, "divisions", [helper.make_tensor_value_info(n, TensorProto.FLOAT, SHAPE)
                                                   for n in ("x", "y")],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, SHAPE)],
                              [numpy_helper.from_array(np.float32(4), "four"), numpy_helper.from_array(c, "c")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)
    for node in model.graph.node:  # the exporter's module path, which new nodes inherit
        node.metadata_props.add(key=MODULE_KEY, value=f"block.{node.name}")
    path.write_bytes(model.SerializeToString())
    return path


def _feeds():
    rng = np.random.default_rng(0)
    return {"x": rng.standard_normal(SHAPE).astype(np.float32),
            "y": (rng.uniform(0.5, 2.0, SHAPE) * rng.choice([-1, 1], SHAPE)).astype(np.float32)}


def test_a_rule_rewrites_its_matches_tags_them_and_keeps_the_values(tmp_path):
    src = _divisions(tmp_path / "src.onnx")
    graph = load_graph(src)
    report = apply(graph, [DivByConstantAsMul()])
    assert [m.div.name for m in report.matches] == ["div_four", "div_c"] and not report.rejected
    assert [(n.op, n.name) for n in graph.nodes] == [("Mul", "div_four"), ("Relu", "relu"), ("Div", "div_y"),
                                                     ("Mul", "div_c")]
    for node in graph.nodes:
        rewritten = node.op == "Mul"
        assert node_meta(node).get(PASS_KEY) == ("div-as-mul" if rewritten else None)
        assert node_meta(node)[MODULE_KEY] == f"block.{node.name}"  # inherited from the node replaced
    assert graph.outputs[0].name == "out" and producer(graph.outputs[0]).op == "Mul"  # the output keeps its name
    out = save_graph(graph, tmp_path / "out.onnx")
    assert node_meta(load_graph(out).nodes[0])[PASS_KEY] == "div-as-mul"  # provenance survives save and load
    feeds = _feeds()
    np.testing.assert_allclose(make_session(out, optimize=False).run(None, feeds)[0],
                               make_session(src, optimize=False).run(None, feeds)[0], rtol=RTOL, atol=ATOL)


def test_a_check_rejects_with_its_reason_counted_and_logged(tmp_path, caplog):
    graph = load_graph(_divisions(tmp_path / "src.onnx", zero_divisor=True))
    with caplog.at_level(logging.DEBUG, logger="qcompile.rewrite"):
        report = apply(graph, [DivByConstantAsMul()])
    assert [m.div.name for m in report.matches] == ["div_four"]
    assert report.rejected == {"the divisor has a zero": 1}
    assert report.detail("1 rewritten") == "1 rewritten; rejected: 1 the divisor has a zero"
    assert [n.op for n in graph.nodes] == ["Mul", "Relu", "Div", "Div"]
    logged = [r.getMessage() for r in caplog.records]
    # A rejected candidate and a node that is not the pattern at all both say why, naming the node;
    # only the rejection is counted (every Div by an activation would otherwise be one).
    assert "div-as-mul: Div 'div_c' rejected: the divisor has a zero" in logged
    assert "div-as-mul: Div 'div_y' does not match: the divisor is not a constant" in logged


def test_find_leaves_the_graph_alone_and_a_node_joins_one_match():
    x = gs.Variable("x", np.float32, SHAPE)
    tensors = [x] + [gs.Variable(f"r{i}", np.float32, SHAPE) for i in range(3)]
    nodes = [gs.Node("Relu", f"relu{i}", inputs=[tensors[i]], outputs=[tensors[i + 1]]) for i in range(3)]
    graph = gs.Graph(nodes=nodes, inputs=[x], outputs=[tensors[-1]], opset=20)
    report = find(graph, ReluChain())
    # relu0 -> relu1 is one match; relu1 is taken, so relu2 starts no match (it has no Relu after it).
    assert [[n.name for n in m.nodes] for m in report.matches] == [["relu0", "relu1"]]
    assert len(graph.nodes) == 3 and not report.rejected


def test_graph_queries():
    x = gs.Variable("x", np.float32, [2, 4, 3, 3])
    shared, y, z = (gs.Variable(n, np.float32, [2, 4, 3, 3]) for n in ("s", "y", "z"))
    gamma = gs.Constant("gamma", np.arange(4, dtype=np.float32).reshape(4, 1, 1))
    mul = gs.Node("Mul", "mul", inputs=[x, gamma], outputs=[shared])
    relu = gs.Node("Relu", "relu", inputs=[shared], outputs=[y])
    neg = gs.Node("Neg", "neg", inputs=[shared], outputs=[z])
    graph = gs.Graph(nodes=[mul, relu, neg], inputs=[x], outputs=[y, z], opset=20)
    view = GraphView.of(graph)
    assert producer(shared) is mul and producer(x) is None
    assert view.only_consumer(shared) is None and view.only_consumer(x, "Mul") is mul
    assert view.only_consumer(y) is None  # a graph output is never absorbed
    assert subgraph([x], [y]) == (relu, mul)  # walking back from y to x: gamma is a constant
    assert view.escaping((mul, relu), [y]) is shared  # Neg reads the product too
    assert view.escaping((mul, relu, neg), [y, z]) is None
    np.testing.assert_array_equal(per_channel(gamma, 4, 4), [0, 1, 2, 3])
    assert per_channel(gs.Constant("row", np.ones((1, 1, 1, 3), np.float32)), 4, 4) is None
    assert weight_axis(gs.Node("Gemm", attrs={"transB": 1}), 2) == 0 and weight_axis(mul, 4) is None


@pytest.mark.parametrize("shared_variance", [False, True])
def test_a_fusion_names_why_it_did_not_fire(tmp_path, shared_variance):
    """What a user sees in the pass log when a LayerNorm is left decomposed: the reason, counted."""
    from qcompile.pass_manager import PassContext, PassManager
    from qcompile.passes.cleanup import NameNodes
    from qcompile.passes.fuse_layernorm import FuseLayerNorm
    from qcompile.passes.infer_shapes import InferShapes

    inits = [numpy_helper.from_array(np.float32(2), "two"), numpy_helper.from_array(np.float32(1e-5), "eps"),
             numpy_helper.from_array(np.array([-1], np.int64), "axes")]
    nodes = [helper.make_node("ReduceMean", ["x", "axes"], ["mean"]), helper.make_node("Sub", ["x", "mean"], ["d"]),
             helper.make_node("Pow", ["d", "two"], ["sq"]), helper.make_node("ReduceMean", ["sq", "axes"], ["var"]),
             helper.make_node("Add", ["var", "eps"], ["ve"]), helper.make_node("Sqrt", ["ve"], ["std"]),
             helper.make_node("Div", ["d", "std"], ["y"])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if shared_variance:
        outputs.append(helper.make_tensor_value_info("var", TensorProto.FLOAT, None))
    model = helper.make_model(helper.make_graph(nodes, "ln", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                            SHAPE)], outputs, inits),
                              opset_imports=[helper.make_opsetid("", 20)], ir_version=10)
    src = tmp_path / "ln.onnx"
    src.write_bytes(model.SerializeToString())
    graph = load_graph(src)
    ctx = PassContext()
    PassManager([InferShapes(), NameNodes(), FuseLayerNorm()]).run(graph, ctx)
    if shared_variance:
        assert ctx.log[-1].detail == "0 fused; rejected: 1 an intermediate of the norm is read elsewhere"
        assert len(graph.nodes) == 7
    else:
        assert ctx.log[-1].detail == "1 fused" and [n.op for n in graph.nodes] == ["LayerNormalization"]
    feed = {"x": np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)}
    got = make_session(save_graph(graph, tmp_path / "out.onnx"), optimize=False).run(None, feed)
    for g, w in zip(got, make_session(src, optimize=False).run(None, feed), strict=True):
        np.testing.assert_allclose(g, w, rtol=RTOL, atol=ATOL)
