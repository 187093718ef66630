"""Q/DQ planning with the TFLite capabilities: fixed output parameters for LOGISTIC/SOFTMAX, int8 kernels
for activation-only ops; and the ORT plan unchanged by those capability fields."""

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from graphs import compile_bucket
from onnx import TensorProto, helper, numpy_helper

from qcompile.calibration.estimators import estimate_ranges
from qcompile.calibration.inputs import InputSet
from qcompile.calibration.recorder import record_input_set
from qcompile.calibration.stats import collect_stats
from qcompile.config import Estimator
from qcompile.evaluation.metrics import cosine
from qcompile.graph_io import load_graph, save_graph
from qcompile.pass_manager import PassContext
from qcompile.passes.infer_shapes import InferShapes
from qcompile.passes.insert_qdq import plan_quantization
from qcompile.targets.ort_int8.target import ORT_INT8_CAPS
from qcompile.targets.tflite.caps import TFLITE_INT8_WIDE_CAPS
from qcompile.targets.tflite.inspect import operators
from qcompile.targets.tflite.options import TfliteOptions
from qcompile.targets.tflite.runner import TfliteRunner
from qcompile.targets.tflite.target import TfliteInt8Target
from qcompile.targets.tflite.validate import run_onnx_static

pytest.importorskip("ai_edge_litert.interpreter", reason="ai-edge-litert is not installed")


def _silu_softmax_model():
    """x -> Conv -> SiLU (Sigmoid, Mul) -> Conv -> Softmax(channels) -> Gelu -> Conv -> y."""
    rng = np.random.default_rng(0)
    inits = {f"w{i}": (rng.standard_normal((8, 4 if i == 1 else 8, 3, 3)) * 0.3).astype(np.float32) for i in (1, 2, 3)}
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], "conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Sigmoid", ["c1"], ["s"], "sigmoid"),
             helper.make_node("Mul", ["c1", "s"], ["m"], "silu"),
             helper.make_node("Conv", ["m", "w2"], ["c2"], "conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Softmax", ["c2"], ["p"], "softmax", axis=1),
             helper.make_node("Gelu", ["p"], ["g"], "gelu"),
             helper.make_node("Conv", ["g", "w3"], ["y"], "conv3", pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "silu", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)


@pytest.fixture
def model_path(tmp_path):
    import onnx

    path = tmp_path / "m.onnx"
    onnx.save(_silu_softmax_model(), str(path))
    return path


def test_ort_plan_is_unchanged_by_the_new_fields(model_path):
    plan = plan_quantization(load_graph(model_path), ORT_INT8_CAPS)
    assert plan.fixed == () and plan.activations == ("x", "c1", "m", "c2", "g")


def test_wide_tflite_plan_runs_activations_in_int8_with_fixed_outputs(model_path, tmp_path):
    graph = load_graph(model_path)
    plan = plan_quantization(graph, TFLITE_INT8_WIDE_CAPS)
    assert set(plan.fixed) == {("s", 1 / 256, -128), ("p", 1 / 256, -128)}
    assert {"s", "m", "p", "g"} <= set(plan.shared_outputs)
    x = np.random.default_rng(1).standard_normal((16, 4, 8, 8)).astype(np.float32)
    recording = record_input_set(InputSet({"x": x}, None), tmp_path / "rec", {})
    ranges = estimate_ranges(collect_stats(model_path, graph, recording, names=plan.activations), Estimator.MAX)
    target = TfliteInt8Target(TfliteOptions(batch=2))
    target.caps = TFLITE_INT8_WIDE_CAPS
    compiled = compile_bucket(target, graph, plan, ranges)
    q_sigmoid = [n for n in graph.nodes if n.op == "QuantizeLinear" and n.inputs[0].name == "s"][0]
    assert float(q_sigmoid.inputs[1].values) == np.float32(1 / 256) and int(q_sigmoid.inputs[2].values) == -128
    qdq = save_graph(graph.copy(), tmp_path / "qdq.onnx")
    [[name]] = target.emit([compiled], tmp_path).bucket_files
    ops = {(op.code, op.input_types[0]) for op in operators(tmp_path / name)}
    assert {("LOGISTIC", "INT8"), ("MUL", "INT8"), ("SOFTMAX", "INT8"), ("GELU", "INT8")} <= ops
    feed = {"x": x[:4]}
    assert cosine(run_onnx_static(qdq, feed, 2), TfliteRunner([tmp_path / name]).run(feed)) > 0.9999


def test_float64_activations_are_never_quantized():
    """Flux computes RoPE positions in float64: an activation MatMul or Mul there stays float."""
    nodes = [helper.make_node("Cast", ["p"], ["pd"], to=TensorProto.DOUBLE),
             helper.make_node("MatMul", ["pd", "pd_t"], ["outer"]),
             helper.make_node("Mul", ["outer", "outer"], ["sq"]),
             helper.make_node("Cast", ["sq"], ["y"], to=TensorProto.FLOAT)]
    graph = helper.make_graph(
        [helper.make_node("Transpose", ["pd"], ["pd_t"], perm=[1, 0]), *nodes], "rope",
        [helper.make_tensor_value_info("p", TensorProto.FLOAT, [4, 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 4])])
    g = gs.import_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10))
    g.toposort()
    InferShapes().run(g, PassContext())
    assert plan_quantization(g, TFLITE_INT8_WIDE_CAPS).activations == ()
