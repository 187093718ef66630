"""tools/qdq_error_budget.py: kinds of quantization points, and graphs with chosen points made float."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from qdq_error_budget import point_kinds, without_points  # noqa: E402

RNG = np.random.default_rng(0)
W = (0.3 * RNG.standard_normal((4, 2, 3, 3))).astype(np.float32)  # outputs well inside the ranges below


def _qdq(name: str, src: str, scale: float, nodes: list, inits: list) -> str:
    inits += [numpy_helper.from_array(np.array(scale, np.float32), f"{name}_s"),
              numpy_helper.from_array(np.array(128, np.uint8), f"{name}_z")]
    nodes += [helper.make_node("QuantizeLinear", [src, f"{name}_s", f"{name}_z"], [f"{name}_q"], name=f"{name}_Q"),
              helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_s", f"{name}_z"], [f"{name}_dq"],
                               name=f"{name}_DQ")]
    return f"{name}_dq"


def qdq_model() -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """x -> Q/DQ -> Conv -> Q/DQ -> Reshape -> Q/DQ (same parameters) -> Relu -> Q/DQ -> y; and its float twin."""
    nodes: list = []
    inits = [numpy_helper.from_array(W, "w"), numpy_helper.from_array(np.array([1, -1], np.int64), "shape")]
    x = _qdq("x", "x", 0.03, nodes, inits)
    nodes.append(helper.make_node("Conv", [x, "w"], ["conv"], name="conv", pads=[1, 1, 1, 1]))
    c = _qdq("conv", "conv", 0.1, nodes, inits)
    nodes.append(helper.make_node("Reshape", [c, "shape"], ["flat"], name="reshape"))
    f = _qdq("flat", "flat", 0.1, nodes, inits)
    nodes.append(helper.make_node("Relu", [f], ["relu"], name="relu"))
    _qdq("relu", "relu", 0.05, nodes, inits)
    nodes.append(helper.make_node("Identity", ["relu_dq"], ["y"], name="out"))
    io = ([helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 5, 5])],
          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    opset = [helper.make_opsetid("", 13)]
    quantized = helper.make_model(helper.make_graph(nodes, "q", *io, inits), opset_imports=opset, ir_version=9)
    float_nodes = [helper.make_node("Conv", ["x", "w"], ["conv"], pads=[1, 1, 1, 1]),
                   helper.make_node("Reshape", ["conv", "shape"], ["flat"]),
                   helper.make_node("Relu", ["flat"], ["y"])]
    fp = helper.make_model(helper.make_graph(float_nodes, "f", *io, inits[:2]), opset_imports=opset, ir_version=9)
    return quantized, fp


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_kinds_look_through_data_movement() -> None:
    quantized, _ = qdq_model()
    assert point_kinds(quantized) == {"x_Q": "input:x", "conv_Q": "Conv", "flat_Q": "Conv", "relu_Q": "Relu"}


def test_every_point_float_is_the_float_model_and_none_is_the_artifact() -> None:
    quantized, fp = qdq_model()
    x = np.clip(RNG.standard_normal((1, 2, 5, 5)), -3, 3).astype(np.float32)
    expected, got = run(fp, x), run(quantized, x)
    assert np.abs(got - expected).max() > 1e-3  # the quantized graph differs from float
    assert np.array_equal(run(without_points(quantized, ()), x), got)
    np.testing.assert_allclose(run(without_points(quantized, point_kinds(quantized)), x), expected, atol=1e-5)
    # the input alone float: the Conv's and the Relu's outputs are still rounded to their grids
    partial = run(without_points(quantized, ["x_Q"]), x)
    assert np.abs(partial - expected).max() <= 0.1 / 2 + 0.05 / 2 + 1e-6
    rms = lambda y: float(np.sqrt(np.mean((y - expected) ** 2)))  # noqa: E731
    assert rms(partial) < rms(got)
