"""A small conv net end to end through the product path: plan_quantization + InsertQDQ with the TFLite
caps, the tflite-int8 pipeline and emitter, the runner; and timestep buckets as signatures of one file."""

import json

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from graphs import compile_bucket, conv_mlp_model, manifest_for, save_with_external_data

from qcompile.calibration.estimators import estimate_ranges
from qcompile.calibration.inputs import InputSet
from qcompile.calibration.recorder import record_input_set
from qcompile.calibration.stats import collect_stats
from qcompile.config import Estimator
from qcompile.evaluation.metrics import cosine
from qcompile.graph_io import load_graph, replace_input, save_graph
from qcompile.pass_manager import PassContext, PassManager
from qcompile.passes.canonicalize import canonicalize_passes
from qcompile.passes.insert_qdq import plan_quantization
from qcompile.runtime import make_session
from qcompile.targets.tflite.inspect import operators
from qcompile.targets.tflite.options import TfliteOptions
from qcompile.targets.tflite.runner import TfliteRunner
from qcompile.targets.tflite.target import TfliteFp32Target, TfliteInt8Target
from qcompile.targets.tflite.validate import lsb_agreement, quantized_tensor_agreement, run_onnx_static

pytest.importorskip("ai_edge_litert.interpreter", reason="ai-edge-litert is not installed")


BATCH = 2


@pytest.fixture(scope="module")
def canonical(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("convnet")
    graph = load_graph(save_with_external_data(conv_mlp_model(), tmp / "m.onnx"))
    PassManager(canonicalize_passes(), fixed_point=True).run(graph, PassContext())
    return save_graph(graph, tmp / "canon.onnx")


def _inputs(n, seed, scale=1.0):
    return {"x": (np.random.default_rng(seed).standard_normal((n, 3, 8, 8)) * scale).astype(np.float32)}


def _quantized_graphs(canonical, tmp_path, scales=(1.0,)):
    """One Q/DQ graph per calibration set (a stand-in for timestep buckets with different ranges)."""
    target = TfliteInt8Target(TfliteOptions(batch=BATCH))
    graphs = []
    for k, scale in enumerate(scales):
        graph = load_graph(canonical)
        plan = plan_quantization(graph, target.caps)
        recording = record_input_set(InputSet(_inputs(16, k, scale), None), tmp_path / f"rec{k}", {})
        ranges = estimate_ranges(collect_stats(canonical, graph, recording, names=plan.activations), Estimator.MAX)
        graphs.append(compile_bucket(target, graph, plan, ranges, k))
    return target, graphs


def test_int8_convnet_matches_the_qdq_graph(canonical, tmp_path):
    target, [compiled] = _quantized_graphs(canonical, tmp_path)
    graph = compiled.graph
    qdq = save_graph(graph.copy(), tmp_path / "qdq.onnx")
    [[name]] = target.emit([compiled], tmp_path).bucket_files
    feed = _inputs(5, 7)  # 5 samples through a batch-2 model: chunks, the last one padded
    ref = run_onnx_static(qdq, feed, BATCH)
    got = TfliteRunner([tmp_path / name]).run(feed)
    # The output is float (graph outputs are not quantized): its last int8 tensor is the FC output.
    fc_scale = [n for n in graph.nodes if n.op == "QuantizeLinear" and n.inputs[0].name == "mm"][0].inputs[1].values
    agreement = lsb_agreement(ref, got, float(fc_scale))
    assert agreement.max_lsb <= 1.0 + 1e-3, agreement
    ops = [(op.code, op.input_types[0]) for op in operators(tmp_path / name)]
    assert ops.count(("CONV_2D", "INT8")) == 2 and ("FULLY_CONNECTED", "INT8") in ops
    # NHWC inside: the only transpose is the one the NCHW flatten before the FC needs.
    assert sum(code == "TRANSPOSE" for code, _ in ops) == 1
    fp32 = make_session(canonical).run(None, feed)[0]
    assert cosine(fp32, got) > 0.998


def test_fp32_convnet_matches_onnxruntime(canonical, tmp_path):
    target = TfliteFp32Target(TfliteOptions(batch=BATCH))
    graph = load_graph(canonical)
    compiled = compile_bucket(target, graph, None, {})
    [[name]] = target.emit([compiled], tmp_path).bucket_files
    feed = _inputs(4, 3)
    np.testing.assert_allclose(TfliteRunner([tmp_path / name]).run(feed), make_session(canonical).run(None, feed)[0],
                               rtol=1e-4, atol=1e-5)


def test_buckets_are_signatures_of_one_file_sharing_weights(canonical, tmp_path):
    target, graphs = _quantized_graphs(canonical, tmp_path, scales=(1.0, 3.0))
    one_dir, two_dir = tmp_path / "one", tmp_path / "two"
    [[single]] = target.emit(graphs[:1], one_dir).bucket_files
    files = target.emit(graphs, two_dir).bucket_files
    assert files == (("model.tflite",), ("model.tflite",))
    int8_weights = sum(t.values.nbytes for t in graphs[0].graph.tensors().values()
                       if isinstance(t, gs.Constant) and t.values.dtype == np.int8)
    single_size = (one_dir / single).stat().st_size
    extra = (two_dir / "model.tflite").stat().st_size - single_size
    assert int8_weights > 5000 and extra <= single_size - int8_weights  # no weight stored twice
    manifest = manifest_for(files, ((0.0, 500.0), (500.0, 1000.0)))
    runner = target.runner(two_dir, manifest)
    assert runner.buckets == 2 and runner.bucket_of(100.0) == 0 and runner.bucket_of(700.0) == 1
    assert not runner.loaded  # the interpreter opens on the first run
    feed = _inputs(2, 9, 3.0)
    for compiled, k in zip(graphs, range(2), strict=True):
        ref = run_onnx_static(save_graph(compiled.graph.copy(), tmp_path / f"b{k}.onnx"), feed, BATCH)
        assert cosine(ref, runner.run_bucket(k, feed)) > 0.9999
    runner.release()  # let go, then opened again on the next run, with the same result
    assert not runner.loaded and cosine(ref, runner.run_bucket(1, feed)) > 0.9999


def _q_output(graph, tensor):
    return next(n.outputs[0].name for n in graph.nodes if n.op == "QuantizeLinear" and n.inputs[0].name == tensor)


def test_validation_compares_each_int8_tensor_locally(canonical, tmp_path):
    """The build's device check: every int8 tensor of the .tflite against onnxruntime on the Q/DQ graph,
    each computed from the interpreter's own upstream int8 tensors. It passes on the emitted file and
    points at the one layer whose computation differs when the Q/DQ graph is altered."""
    target, [compiled] = _quantized_graphs(canonical, tmp_path)
    graph = compiled.graph
    target.emit([compiled], tmp_path)
    [entry] = json.loads((tmp_path / "qdq" / "tensors.json").read_text())["buckets"]
    assert entry["signature"] == "serving_default"
    qdq, quantized, feed = tmp_path / entry["qdq"], entry["quantized"], _inputs(3, 5)
    c1, c2 = _q_output(graph, "c1"), _q_output(graph, "c2")
    good = {t.name: t for t in quantized_tensor_agreement(tmp_path / "model.tflite", "serving_default", qdq,
                                                          quantized, feed, batch=BATCH)}
    assert {c1, c2} <= set(good) and all(t.local_max_lsb <= 1 for t in good.values()), good
    altered = load_graph(qdq)
    conv2 = next(n for n in altered.nodes if n.op == "Conv" and n.outputs[0].name == "c2")
    dequantize = conv2.inputs[1].inputs[0]
    weight = dequantize.inputs[0]  # the int8 constant
    negated = (-np.asarray(weight.values, np.int16)).clip(-127, 127).astype(np.int8)
    replace_input(dequantize, weight, gs.Constant(weight.name + "_negated", negated))
    bad = save_graph(altered, tmp_path / "qdq" / "altered.onnx")
    got = {t.name: t for t in quantized_tensor_agreement(tmp_path / "model.tflite", "serving_default", bad,
                                                         quantized, feed, batch=BATCH)}
    assert got[c1].local_max_lsb <= 1 and got[c1].max_lsb <= 1  # upstream of the change: untouched
    assert got[c2].local_max_lsb > 10 and got[c2].local_fraction_differ > 0.5
