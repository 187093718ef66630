"""The engine side: optimization profiles from the adapter's axes record (checked here), and the engine
build itself, which needs TensorRT and a GPU (skipped with the reason where they are missing)."""

from __future__ import annotations

import json

import numpy as np
import onnx_graphsurgeon as gs
import pytest

from qcompile.graph_io import save_graph
from qcompile.manifest import InputRecord
from qcompile.targets.tensorrt import engine

SAMPLE_AXES = (
    {"name": "batch", "dynamic": True, "default": 1, "multiple": 1, "min": 1, "max": 4096},
    {"name": "sample.1", "dynamic": False, "default": 4},
    {"name": "height", "dynamic": True, "default": 32, "multiple": 8, "min": 8, "max": 128},
    {"name": "width", "dynamic": True, "default": 32, "multiple": 8, "min": 8, "max": None},
)


def test_profile_from_axes_record():
    inputs = [InputRecord("sample", (1, 4, 32, 32), "float32", "sample", SAMPLE_AXES),
              InputRecord("timestep", (1,), "float32", "timestep", (SAMPLE_AXES[0],))]
    shapes = engine.profiles(inputs, max_batch=8, extra={"qcompile_bucket": [1]})
    assert shapes["sample"] == {"min": [1, 4, 8, 8], "opt": [2, 4, 32, 32], "max": [8, 4, 128, 64]}
    assert shapes["timestep"] == {"min": [1], "opt": [2], "max": [8]}
    assert shapes["qcompile_bucket"] == {"min": [1], "opt": [1], "max": [1]}


def test_profile_without_record_takes_axis_0_as_batch():
    shapes = engine.profiles([InputRecord("z", (1, 4, 16, 16), "float32", "sample")], max_batch=3)
    assert shapes["z"] == {"min": [1, 4, 16, 16], "opt": [2, 4, 16, 16], "max": [3, 4, 16, 16]}


def test_axis_range_respects_multiple_and_limits():
    assert engine.axis_range({"name": "tokens", "dynamic": True, "default": 77, "multiple": 1, "min": 1,
                              "max": 77}, 8) == (1, 77, 77)
    assert engine.axis_range({"name": "height", "dynamic": True, "default": 24, "multiple": 16, "min": 1,
                              "max": None}, 8) == (16, 24, 48)


def test_unavailable_says_why_in_one_line():
    reason = engine.unavailable()
    if reason is None:
        pytest.skip("TensorRT and a GPU are present: nothing to explain")
    assert "\n" not in reason and reason


@pytest.mark.skipif(engine.unavailable() is not None, reason=f"engine build: {engine.unavailable()}")
def test_engine_builds_from_qdq_onnx_and_matches_onnxruntime(tmp_path):  # pragma: no cover - GPU machines
    """A strongly typed int8 Q/DQ Conv built through Polygraphy, run with TrtRunner, against onnxruntime."""
    from qcompile.runtime import make_session

    rng = np.random.default_rng(0)
    x = gs.Variable("x", np.float32, ("batch", 32, 8, 8))
    w = gs.Constant("w", rng.integers(-127, 128, (32, 32, 3, 3)).astype(np.int8))
    nodes, xs, z = [], gs.Constant("xs", np.array(0.02, np.float32)), gs.Constant("xz", np.array(0, np.int8))
    xq, xd = gs.Variable("xq", np.int8), gs.Variable("xd", np.float32)
    wd, y = gs.Variable("wd", np.float32), gs.Variable("y", np.float32)
    nodes += [gs.Node("QuantizeLinear", "q", {}, [x, xs, z], [xq]),
              gs.Node("DequantizeLinear", "dq", {}, [xq, xs, z], [xd]),
              gs.Node("DequantizeLinear", "wdq", {"axis": 0},
                      [w, gs.Constant("ws", np.full(32, 0.003, np.float32)), gs.Constant("wz", np.zeros(32, np.int8))],
                      [wd]),
              gs.Node("Conv", "conv", {"pads": [1, 1, 1, 1]}, [xd, wd], [y])]
    path = save_graph(gs.Graph(nodes=nodes, inputs=[x], outputs=[y], opset=19), tmp_path / "m.onnx")
    shapes = {"x": {"min": [1, 32, 8, 8], "opt": [2, 32, 8, 8], "max": [4, 32, 8, 8]}}
    sidecar = engine.build_engine(path, tmp_path / "m.engine", shapes, opt_level=3, timing_cache=tmp_path / "tc",
                                  sidecar={"outputs": ["y"]})
    assert (tmp_path / "tc").is_file() and json.loads((tmp_path / "m.engine.json").read_text())["gpu"]
    runner = engine.EngineRunner(tmp_path / "m.engine")
    feed = {"x": rng.normal(0, 1, (2, 32, 8, 8)).astype(np.float32)}
    got = runner.run(feed)
    runner.close()
    ref = make_session(path, optimize=False).run(None, feed)[0]
    assert sidecar["tensorrt"]
    np.testing.assert_allclose(got, ref, rtol=0, atol=0.02 * 0.003 * 32 * 9)  # a few LSB of the output
