import numpy as np
import onnx
import pytest
from graphs import conv_mlp_model, run, save_with_external_data

from qcompile.calibration.estimators import estimate_ranges
from qcompile.calibration.inputs import InputSet
from qcompile.calibration.recorder import record_input_set
from qcompile.calibration.stats import collect_stats
from qcompile.config import Estimator
from qcompile.evaluation.metrics import cosine, sqnr_db
from qcompile.graph_io import load_graph, save_graph
from qcompile.pass_manager import PassContext, PassManager
from qcompile.passes.canonicalize import canonicalize_passes
from qcompile.passes.insert_qdq import plan_quantization
from qcompile.runtime import make_session
from qcompile.target import BucketJob
from qcompile.targets.ort_int8.target import OrtInt8Target


@pytest.fixture
def canonical(tmp_path):
    graph = load_graph(save_with_external_data(conv_mlp_model(), tmp_path / "m.onnx"))
    PassManager(canonicalize_passes(), fixed_point=True).run(graph, PassContext())
    return save_graph(graph, tmp_path / "canon.onnx")


def _inputs(n, seed):
    return InputSet({"x": np.random.default_rng(seed).standard_normal((n, 3, 8, 8)).astype(np.float32)}, None)


def _quantize(canonical, out, exclude=()):
    target = OrtInt8Target()
    graph = load_graph(canonical)
    plan = plan_quantization(graph, target.caps, exclude)
    recording = record_input_set(_inputs(32, 0), out.parent / "recording", {})
    table = collect_stats(canonical, graph, recording, names=plan.activations)
    ranges = estimate_ranges(table, Estimator.MAX)
    ctx = PassContext()
    compiled = target.compile_bucket(graph, BucketJob(0, plan, ranges, None), ctx)
    files = target.emit([compiled], out.parent).bucket_files[0]
    return plan, out.parent / files[0], ctx


def test_plan_covers_weighted_ops_and_respects_exclusions(canonical):
    caps = OrtInt8Target().caps
    plan = plan_quantization(load_graph(canonical), caps)
    assert [w.node for w in plan.weights] == ["conv1", "conv2", "fc"]
    assert [w.axis for w in plan.weights] == [0, 0, 1]  # MatMul weights are [K, N]: per column
    assert plan.biases == (("conv1", 1),)
    # Conv/MatMul outputs are quantized too (so onnxruntime fuses QLinearConv), except graph outputs.
    assert plan.activations == ("x", "c1", "r1", "c2", "flat", "mm")
    excluded = plan_quantization(load_graph(canonical), caps, exclude=[r"^conv2$"])
    assert excluded.excluded == ("conv2",) and [w.node for w in excluded.weights] == ["conv1", "fc"]


def test_qdq_graph_is_accurate_and_weights_are_int8(canonical, tmp_path):
    plan, qpath, ctx = _quantize(canonical, tmp_path / "q.onnx")
    model = onnx.load(str(qpath))
    inits = {t.name: t for t in model.graph.initializer}
    for name in ("conv1.weight_quantized", "conv2.weight_quantized", "fc.weight_quantized"):
        assert inits[name].data_type == onnx.TensorProto.INT8
    assert inits["conv1.bias_quantized"].data_type == onnx.TensorProto.INT32
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") == len(plan.activations) and "Conv" in ops
    # Every new node says which pass made it.
    q_nodes = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert all({p.key: p.value for p in n.metadata_props}.get("qcompile.pass") == "insert-qdq" for n in q_nodes)
    x = _inputs(16, 1).arrays["x"]
    ref, test = run(canonical, {"x": x}), run(qpath, {"x": x})
    assert sqnr_db(ref, test) > 25.0
    assert cosine(ref, test) > 0.998


def test_onnxruntime_fuses_the_qdq_graph_into_integer_kernels(canonical, tmp_path):
    _, qpath, _ = _quantize(canonical, tmp_path / "q.onnx")
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "fused.onnx")
    ort.InferenceSession(str(qpath), opts, providers=["CPUExecutionProvider"])
    fused_ops = {n.op_type for n in onnx.load(str(tmp_path / "fused.onnx"), load_external_data=False).graph.node}
    assert {"QLinearConv", "QLinearMatMul"} <= fused_ops
    assert "Conv" not in fused_ops and "MatMul" not in fused_ops
    # The fused integer kernels compute what the Q/DQ graph says (reference semantics, unfused).
    x = _inputs(8, 2).arrays["x"]
    fused = make_session(qpath).run(None, {"x": x})[0]
    reference = make_session(qpath, optimize=False).run(None, {"x": x})[0]
    assert cosine(reference, fused) > 0.9999
