import numpy as np
from graphs import conv_mlp_model, run, save_with_external_data

from qcompile.graph_io import load_graph, save_graph
from qcompile.pass_manager import DumpAfter, GraphProperty, PassContext, PassLog, PassManager, graph_properties
from qcompile.passes.canonicalize import canonicalize_passes
from qcompile.passes.cleanup import RemoveIdentity
from qcompile.passes.fold_constants import FoldConstants


def _canonical(tmp_path):
    src = save_with_external_data(conv_mlp_model(), tmp_path / "m.onnx")
    graph = load_graph(src)
    ctx = PassContext([PassLog(), DumpAfter(frozenset({"fold-constants"}), tmp_path / "dumps")])
    result = PassManager(canonicalize_passes(), fixed_point=True).run(graph, ctx)
    return src, graph, ctx, result


def test_canonicalize_folds_and_cleans_with_same_numerics(tmp_path):
    src, graph, ctx, result = _canonical(tmp_path)
    assert result.modified
    assert [n.op for n in graph.nodes] == ["Conv", "Relu", "Conv", "Reshape", "MatMul", "Add"]
    assert {GraphProperty.SHAPES_KNOWN, GraphProperty.NODES_NAMED} <= graph_properties(graph)
    out = save_graph(graph, tmp_path / "canon.onnx")
    x = np.random.default_rng(0).standard_normal((3, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(run(out, {"x": x}), run(src, {"x": x}), rtol=1e-5, atol=1e-6)
    # Every pass is logged with its node counts, and a dump was written after the named pass.
    fold = next(e for e in ctx.log if e.name == "fold-constants")
    assert fold.modified and fold.nodes_after == fold.nodes_before - 1
    assert (tmp_path / "dumps" / "after_fold-constants.onnx").is_file()
    # A second fixed-point round found nothing: the last entries are unmodified.
    assert not any(e.modified for e in ctx.log[-len(canonicalize_passes()):])


def test_single_passes_report_modified_correctly(tmp_path):
    src = save_with_external_data(conv_mlp_model(), tmp_path / "m.onnx")
    graph = load_graph(src)
    ctx = PassContext()
    assert RemoveIdentity().run(graph, ctx).modified
    assert not RemoveIdentity().run(graph, ctx).modified
    assert FoldConstants().run(graph, ctx).modified
    assert not FoldConstants().run(graph, ctx).modified


def test_pass_order_is_checked(tmp_path):
    import pytest

    from qcompile.caps import TargetCaps
    from qcompile.pass_manager import PassOrderError
    from qcompile.passes.insert_qdq import InsertQDQ, QuantPlan
    from qcompile.quant import QuantDType

    graph = load_graph(save_with_external_data(conv_mlp_model(), tmp_path / "m.onnx"))
    caps = TargetCaps(QuantDType.INT8, QuantDType.UINT8, False)
    with pytest.raises(PassOrderError, match="insert-qdq.*NODES_NAMED"):
        PassManager([InsertQDQ(QuantPlan((), (), (), ()), {}, caps)]).run(graph, PassContext())
