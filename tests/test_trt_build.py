"""End to end on a tiny SD UNet: trt-int8 with two buckets (the one-engine graph beside the bucket
graphs) and trt-fp8, linted, emulated in onnxruntime, the engine plan written and the engine built only
where TensorRT and a GPU exist (one line says why not)."""

from __future__ import annotations

import json

import pytest

from qcompile.caps import QuantLevel
from qcompile.config import CalibSpec, CompileConfig, TargetName
from qcompile.errors import UserError
from qcompile.graph_io import constant_values, load_graph, node_meta
from qcompile.rewrite import FUSED_KEY
from qcompile.stages import build
from qcompile.target import options_from_cli
from qcompile.targets.tensorrt import engine
from qcompile.targets.tensorrt.lint import LintRules, lint
from qcompile.targets.tensorrt.options import TrtOptions


@pytest.mark.parametrize("target,buckets,min_cos", [(TargetName.TRT_INT8, 2, 0.99), (TargetName.TRT_FP8, 1, 0.98)],
                         ids=["int8-k2", "fp8"])
def test_tiny_sd_unet_builds_for_trt(tmp_path, capsys, target, buckets, min_cos):
    cfg = CompileConfig(model="builtin:tiny-sd-unet", target=target, out_dir=tmp_path / "out",
                        calib=CalibSpec.parse("synthetic:8"), validate_count=4, buckets=buckets)
    result = build(cfg)
    s, m, out = result.report["summary"], result.manifest, result.out_dir
    assert result.report["runtime"]["name"] == "onnxruntime CPU (TensorRT numerics emulated)"
    assert s["eps_cos_min"] >= min_cos, s
    assert m.device["lint"]["violations"] == 0 and m.device["lint"]["graphs"] == buckets + (buckets > 1)
    plan = json.loads((out / "trt" / "engine_build.json").read_text())
    assert plan["onnx"] == ("trt/model_buckets.onnx" if buckets > 1 else "model.onnx")
    assert plan["profiles"]["sample"]["max"][0] == TrtOptions().max_batch
    graph = load_graph(out / plan["onnx"])
    assert lint(graph, LintRules()) == []
    # FuseAttention's marks reach the engine's ONNX: the tiny UNet's 8 attention units, each on its Softmax.
    units = {node_meta(n).get(FUSED_KEY) for n in graph.nodes if n.op == "Softmax"}
    assert units == {f"attention:{i}" for i in range(8)}, units
    zero_types = {constant_values(n.inputs[2]).dtype.name for n in graph.nodes if n.op == "QuantizeLinear"}
    assert zero_types == {"int8" if target is TargetName.TRT_INT8 else "float8_e4m3fn"}
    why = engine.unavailable()
    if why is not None:
        assert f"engine not built: {why}" in capsys.readouterr().out
        assert result.report["device"]["tensorrt"]["not_built_because"] == why
        assert not (out / "trt" / "model.engine").exists()
    else:  # pragma: no cover - GPU machines
        assert (out / "trt" / "model.engine").is_file() and (out / "trt" / "model.engine.json").is_file()


def test_trt_options_from_the_command_line():
    opts = options_from_cli(TargetName.TRT_FP8, {"--trt-level": QuantLevel.QKV, "--trt-max-batch": None})
    assert opts == TrtOptions(level=QuantLevel.QKV)
    with pytest.raises(UserError, match="--static-batch: target trt-int8 does not take it"):
        options_from_cli(TargetName.TRT_INT8, {"--static-batch": 2})
