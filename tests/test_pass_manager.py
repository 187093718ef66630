"""The pass contract: properties checked on the graph a pass is given, errors that name the pass and what
ran before it, nesting, and instruments."""

import onnx_graphsurgeon as gs
import pytest
from graphs import conv_mlp_model, save_with_external_data

from qcompile.graph_io import copy_graph, load_graph, node_meta
from qcompile.pass_manager import (
    GraphProperty,
    Pass,
    PassContext,
    PassError,
    PassLog,
    PassManager,
    PassOrderError,
    PassResult,
    graph_properties,
)
from qcompile.passes.cleanup import NameNodes
from qcompile.passes.infer_shapes import InferShapes
from qcompile.passes.linear_as_gemm import LinearAsGemm


class Explodes(Pass):
    name = "explodes"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        raise ValueError("boom")


@pytest.fixture
def graph(tmp_path):
    return load_graph(save_with_external_data(conv_mlp_model(), tmp_path / "m.onnx"))


def test_a_pass_requiring_shapes_refuses_a_graph_without_them(graph):
    """LinearAsGemm requires inferred shapes: a freshly loaded graph has none established, whatever
    another graph in the same context had."""
    ctx = PassContext()
    other = copy_graph(graph)
    PassManager([InferShapes()]).run(other, ctx)
    assert GraphProperty.SHAPES_KNOWN in graph_properties(other)
    with pytest.raises(PassOrderError, match=r"pass 'linear-as-gemm' in 'pipeline' requires SHAPES_KNOWN"):
        PassManager([NameNodes(), LinearAsGemm()]).run(graph, ctx)
    PassManager([InferShapes(), LinearAsGemm()]).run(graph, ctx)  # established first: accepted


def test_a_raising_pass_is_named_with_the_passes_before_it(graph):
    inner = PassManager([InferShapes(), Explodes()], name="inner")
    with pytest.raises(PassError, match=r"pass 'inner/explodes' failed after \[infer-shapes\]: ValueError: boom"):
        PassManager([NameNodes(), inner], name="outer").run(graph, PassContext())


def test_nested_managers_log_leaf_passes_and_keep_properties(graph):
    log = PassLog()
    PassManager([NameNodes(), PassManager([InferShapes()], name="inner")]).run(graph, PassContext([log]))
    assert [e.name for e in log.entries] == ["name-nodes", "infer-shapes"]
    assert {GraphProperty.NODES_NAMED, GraphProperty.SHAPES_KNOWN} <= graph_properties(graph)


def test_copies_keep_metadata_and_properties(graph):
    PassManager([NameNodes(), InferShapes()]).run(graph, PassContext())
    node_meta(graph.nodes[0])["qcompile.module"] = "conv_in"
    copy = copy_graph(graph)
    assert node_meta(copy.nodes[0]) == {"qcompile.module": "conv_in"} and copy.nodes[0] is not graph.nodes[0]
    assert graph_properties(copy) == graph_properties(graph)
