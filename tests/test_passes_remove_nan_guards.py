"""RemoveNanGuards: Where(IsNaN(x), c, x) is x wherever x is finite (always, in an integer graph)."""

from __future__ import annotations

import numpy as np
import onnx
from graphs import save_with_external_data
from onnx import TensorProto, helper, numpy_helper

from qcompile.graph_io import load_graph, save_graph
from qcompile.pass_manager import PassContext, PassManager
from qcompile.passes.remove_nan_guards import RemoveNanGuards, nan_guards
from qcompile.runtime import make_session


def _guarded() -> onnx.ModelProto:
    """x -> Softmax -> Where(IsNaN, 0, .) -> MatMul; a second guard is the graph output itself."""
    nodes = [helper.make_node("Softmax", ["x"], ["p"], "softmax", axis=-1),
             helper.make_node("IsNaN", ["p"], ["nan"], "isnan"),
             helper.make_node("Where", ["nan", "zero", "p"], ["g"], "guard"),
             helper.make_node("MatMul", ["g", "w"], ["y"], "mm"),
             helper.make_node("IsNaN", ["y"], ["nan2"], "isnan2"),
             helper.make_node("Where", ["nan2", "zero", "y"], ["out"], "guard_out")]
    inits = [numpy_helper.from_array(np.float32(0), "zero"),
             numpy_helper.from_array(np.random.default_rng(0).standard_normal((6, 3)).astype(np.float32), "w")]
    graph = helper.make_graph(nodes, "guarded", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 6])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 4, 3])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)


def test_guards_go_and_the_output_keeps_its_name(tmp_path):
    src = save_with_external_data(_guarded(), tmp_path / "src.onnx")
    graph = load_graph(src)
    assert len(nan_guards(graph)) == 2
    PassManager([RemoveNanGuards()]).run(graph, PassContext())
    ops = [n.op for n in graph.nodes]
    # the graph output's guard goes too (HTP refuses a Where at either width); its producer writes "out"
    assert ops.count("Where") == 0 and ops.count("IsNaN") == 0 and [t.name for t in graph.outputs] == ["out"]
    assert graph.outputs[0].inputs[0].op == "MatMul"
    out = save_graph(graph, tmp_path / "out.onnx")
    x = np.random.default_rng(1).standard_normal((2, 4, 6)).astype(np.float32)
    np.testing.assert_allclose(make_session(out).run(None, {"x": x})[0], make_session(src).run(None, {"x": x})[0],
                               rtol=1e-6, atol=1e-6)
