"""Q/DQ for integer-only targets: every float tensor and constant quantized, by the target's rules."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from graphs import groupnorm_skip_model, observed_ranges, save_with_external_data
from onnx import TensorProto, helper
from qnn_helpers import quantize_float_model, require_htp

from qcompile.errors import UserError
from qcompile.evaluation.metrics import cosine
from qcompile.graph_io import constant_values, load_graph
from qcompile.passes.groupnorm_affine_conv import GroupNormAffineAsConv
from qcompile.quant import TensorRange
from qcompile.runtime import make_session
from qcompile.targets.qnn.caps import QNN_W8A8_CAPS, QNN_W8A16_CAPS

QDQ = ("QuantizeLinear", "DequantizeLinear")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("integer")
    src = save_with_external_data(groupnorm_skip_model(), folder / "float.onnx")
    rng = np.random.default_rng(0)
    feeds = [{"deep": rng.standard_normal((2, 32, 8, 8)).astype(np.float32) * 2,
              "skip": rng.standard_normal((2, 32, 8, 8)).astype(np.float32)} for _ in range(4)]
    return folder, src, feeds, observed_ranges(src, feeds)


def _qparams(graph, tensor_name):
    q = next(n for n in graph.nodes if n.op == "QuantizeLinear" and n.inputs[0].name == tensor_name)
    return float(constant_values(q.inputs[1])), int(constant_values(q.inputs[2])), constant_values(q.inputs[2]).dtype


# int8 weights bound the 16-bit case (cosine 0.99998 measured)
@pytest.mark.parametrize(("caps", "min_cos"), [(QNN_W8A8_CAPS, 0.995), (QNN_W8A16_CAPS, 0.99995)])
def test_every_op_is_a_node_unit_and_numerics_hold(model, caps, min_cos):
    folder, src, feeds, ranges = model
    bits = caps.activation_dtype.bits
    path = quantize_float_model(src, folder / f"q{bits}.onnx", ranges, caps, [GroupNormAffineAsConv()])
    graph = load_graph(path)
    for node in graph.nodes:
        if node.op in QDQ:
            continue
        for i, t in enumerate(node.inputs):
            if t.dtype is not None and np.dtype(t.dtype) == np.float32:
                assert t.inputs and t.inputs[0].op == "DequantizeLinear", f"{node.name} input {i} is not dequantized"
        for t in node.outputs:
            assert [c.op for c in t.outputs] == ["QuantizeLinear"], f"{node.name} output is not quantized"
    assert [t.name for t in graph.outputs] == ["y"] and graph.outputs[0].inputs[0].op == "DequantizeLinear"
    assert graph.opset == (21 if bits == 16 else 20)
    # data movement keeps the input's parameters; Sigmoid has HTP's fixed full-range encoding
    assert _qparams(graph, "grouped") == _qparams(graph, "cat")
    scale, zero, dtype = _qparams(graph, "sig")
    assert (scale, zero) == (pytest.approx(2.0 ** -bits), 0) and dtype == caps.activation_dtype.numpy
    # conv weights per channel int8, bias int32; the depthwise affine has per-channel scales too
    conv = next(n for n in graph.nodes if n.name == "conv")
    w_dq, b_dq = conv.inputs[1].inputs[0], conv.inputs[2].inputs[0]
    assert constant_values(w_dq.inputs[0]).dtype == np.int8 and constant_values(w_dq.inputs[1]).shape == (16,)
    assert constant_values(b_dq.inputs[0]).dtype == np.int32
    want = make_session(src).run(None, feeds[0])[0]
    got = make_session(path).run(None, feeds[0])[0]
    assert cosine(want, got) > min_cos


def test_a_tensor_without_a_range_is_named(model, tmp_path):
    _, src, _, ranges = model
    partial = {k: v for k, v in ranges.items() if k != "silu"}
    with pytest.raises(UserError, match="no calibrated range for tensor 'silu' \\(Mul silu\\)"):
        quantize_float_model(src, tmp_path / "q.onnx", partial, QNN_W8A8_CAPS)


@pytest.fixture(scope="module")
def softmax_graphs(tmp_path_factory):
    """Flat attention (logits std 0.5 over 64 keys): the narrow output range an estimator picks for it."""
    folder = tmp_path_factory.mktemp("softmax")
    shape = [2, 4, 64, 64]
    graph = helper.make_graph([helper.make_node("Softmax", ["x"], ["y"], "softmax", axis=-1)], "softmax",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)])
    src = save_with_external_data(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)],
                                                    ir_version=10), folder / "float.onnx")
    x = (np.random.default_rng(0).standard_normal(shape) * 0.5).astype(np.float32)
    ranges = {"x": TensorRange(float(x.min()), float(x.max())), "y": TensorRange(0.0, 0.0425)}
    unsnapped = dataclasses.replace(QNN_W8A8_CAPS, power_of_two_scale_ops=frozenset())
    paths = {name: quantize_float_model(src, folder / f"{name}.onnx", ranges, caps)
             for name, caps in (("w8a8", QNN_W8A8_CAPS), ("unsnapped", unsnapped), ("w8a16", QNN_W8A16_CAPS))}
    return paths, {"x": x}


def test_softmax_output_scale_is_rounded_up_to_a_power_of_two_at_8_bits(softmax_graphs):
    paths, _ = softmax_graphs
    assert _qparams(load_graph(paths["w8a8"]), "y_float")[:2] == (2.0 ** -12, 0)  # 0.0425 / 255 = 1.67e-4, up
    assert _qparams(load_graph(paths["unsnapped"]), "y_float")[0] == pytest.approx(0.0425 / 255, rel=1e-6)
    assert _qparams(load_graph(paths["w8a16"]), "y_float")[0] == pytest.approx(0.0425 / 65535, rel=1e-6)


def test_htp_softmax_rows_sum_to_one_only_at_a_power_of_two_scale(softmax_graphs):
    require_htp()
    from qcompile.targets.qnn import ep

    paths, feed = softmax_graphs
    sums = {}
    for name, path in paths.items():
        cpu = make_session(path, optimize=False).run(None, feed)[0].sum(-1)
        htp = ep.htp_session(path).run(None, feed)[0].sum(-1)
        sums[name] = float(np.abs(htp - cpu).mean())
    # measured 0.0 at 2^-12, 0.088 at the calibrated 1.67e-4 (HTP's rows sum to 1.08), 0.0001 at 16 bits
    assert sums["w8a8"] < 0.005 and sums["w8a16"] < 0.005 and sums["unsnapped"] > 0.03
