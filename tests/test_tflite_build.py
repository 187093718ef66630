"""The tiny diffusers UNet built for tflite-int8 by `qcompile.stages.build`: exported, calibrated,
quantized, lowered to a .tflite with two timestep buckets as signatures, run in LiteRT, reported."""

import json

import pytest

from qcompile.config import CalibSpec, CompileConfig, TargetName
from qcompile.stages import build
from qcompile.targets.tflite.inspect import operators
from qcompile.targets.tflite.runner import read_metadata

pytest.importorskip("ai_edge_litert.interpreter", reason="ai-edge-litert is not installed")


def test_tiny_sd_unet_builds_for_tflite_int8(tmp_path, monkeypatch):
    from qcompile.runtime import OnnxRunner
    from qcompile.targets.tflite import target as tflite_target

    # Which models are open when the evaluation runs the float model and the device check compares
    # tensors: the evaluation's interpreter must be closed for both (an SD 1.5 UNet's int8 weights
    # twice over, beside the float model's or the check's own interpreter).
    runners, open_at_float, open_at_check = [], [], []
    make_runner, run_float = tflite_target.TfliteInt8Target.runner, OnnxRunner.run_bucket
    check = tflite_target.quantized_tensor_agreement
    monkeypatch.setattr(tflite_target.TfliteInt8Target, "runner",
                        lambda self, *a: runners.append(make_runner(self, *a)) or runners[-1])
    monkeypatch.setattr(OnnxRunner, "run_bucket",
                        lambda self, *a: open_at_float.append([r.loaded for r in runners]) or run_float(self, *a))
    monkeypatch.setattr(tflite_target, "quantized_tensor_agreement",
                        lambda *a, **k: open_at_check.append([r.loaded for r in runners]) or check(*a, **k))
    cfg = CompileConfig(model="builtin:tiny-sd-unet", target=TargetName.TFLITE_INT8, out_dir=tmp_path / "out",
                        calib=CalibSpec.parse("synthetic:8"), validate_count=4, buckets=2)
    result = build(cfg)
    assert len(runners) == 1 and open_at_check == [[False], [False]], open_at_check
    assert any(open_at_float) and not any(any(opened) for opened in open_at_float), open_at_float
    assert not runners[0].loaded  # let go after the device check
    s, m = result.report["summary"], result.manifest
    assert result.report["runtime"]["name"] == "litert"
    assert s["eps_cos_min"] >= 0.99, s
    assert s["size_bytes"] < 0.5 * s["fp32_size_bytes"]
    assert [b.files for b in m.buckets] == [("model.tflite",), ("model.tflite",)]
    data = (result.out_dir / "model.tflite").read_bytes()
    assert set(read_metadata(data)["signatures"]) == {"bucket_0", "bucket_1"}
    ops = [(op.code, op.input_types[0]) for op in operators(data)]
    assert ops.count(("CONV_2D", "INT8")) >= 30
    # Attention's activation x activation matmuls stay float: XNNPACK delegates no int8 BATCH_MATMUL, so
    # in int8 each one split the delegate and ran TFLite's reference kernel (15% of the reference
    # model's time under perf, and int8 slower than fp32).
    assert ("BATCH_MATMUL", "FLOAT32") in ops and ("BATCH_MATMUL", "INT8") not in ops
    # XNNPACK takes every op but the timestep's SIN and COS: three delegated partitions. (Each op it
    # leaves out splits the graph; the int8 file had 38 partitions when this test was written.)
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=data, num_threads=1)
    interpreter.allocate_tensors()
    partitions = sum(op["op_name"] == "DELEGATE" for op in interpreter._get_ops_details())
    assert partitions <= 3, partitions
    # The interpreter against onnxruntime on the same Q/DQ graph (qdq/ in the artifact): every int8
    # tensor within one LSB when computed from the interpreter's own upstream int8 tensors.
    device = result.report["device"]
    assert result.report["checks"]["interpreter_within_1_lsb"]
    assert len(device["buckets"]) == 2 and all(b["int8_tensors"] > 50 for b in device["buckets"])
    assert device["summary"]["lsb_local_max"] <= 1 and device["summary"]["interpreter_vs_qdq_sqnr_db_min"] > 25
    assert "qdq/tensors.json" in m.sdk_files
    assert result.passed
    json.dumps(result.report)  # the report stays plain JSON


def test_an_artifact_without_qdq_files_fails_the_interpreter_check(tmp_path):
    """Without qdq/tensors.json nothing can be compared: the check fails and says why (it used to be
    skipped, and the build passed with the interpreter never checked)."""
    from graphs import manifest_for

    from qcompile.targets.tflite.target import TfliteInt8Target

    device = TfliteInt8Target().device_checks(tmp_path, manifest_for([("model.tflite",)], [(0.0, 1000.0)]), None)
    assert device.checks == {"interpreter_within_1_lsb": False} and "tensors.json is missing" in device.details["error"]


def test_signatures_run_in_bucket_order_past_ten_buckets():
    """Metadata JSON is written with sorted keys ('bucket_10' before 'bucket_2'): the runner orders the
    programs by subgraph index, and by the key's number for files without it."""
    from qcompile.targets.tflite.runner import _bucket_order

    meta = {f"bucket_{k}": {"subgraph": k} for k in range(12)}
    assert [k for k, _ in sorted(sorted(meta.items()), key=_bucket_order)] == [f"bucket_{k}" for k in range(12)]
    legacy = {f"bucket_{k}": {} for k in range(12)}
    assert [k for k, _ in sorted(sorted(legacy.items()), key=_bucket_order)] == [f"bucket_{k}" for k in range(12)]
