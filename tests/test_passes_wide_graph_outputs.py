"""W8A8 graph outputs at 16 bits: the output op computes at A16W8 behind an exact uint8 -> uint16 Convert,
the result is the 8-bit graph's without its last rounding, and HTP runs it closer to the CPU EP."""

from __future__ import annotations

import numpy as np
import pytest
from graphs import observed_ranges, save_with_external_data
from onnx import TensorProto, helper, numpy_helper
from qnn_helpers import require_htp

from qcompile.evaluation.metrics import sqnr_db
from qcompile.graph_io import constant_values, load_graph, save_graph
from qcompile.pass_manager import PassContext, PassManager
from qcompile.passes.infer_shapes import InferShapes
from qcompile.passes.insert_qdq_integer import InsertQDQEverywhere
from qcompile.passes.wide_graph_outputs import WideGraphOutputs
from qcompile.runtime import make_session
from qcompile.targets.qnn.caps import QNN_W8A8_CAPS, QNN_W8A16_CAPS


def _conv_out_model(seed: int, cin: int = 32, size: int = 16):
    """A denoiser's last layer: Conv to one channel, then a layout Transpose (data movement) to the output."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((1, cin, 3, 3)) * 0.05).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["pre"], "conv_out", pads=[1, 1, 1, 1]),
             helper.make_node("Transpose", ["pre"], ["y"], "to_nhwc", perm=[0, 2, 3, 1])]
    graph = helper.make_graph(
        nodes, "conv_out", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, cin, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, size, size, 1])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array([0.03], np.float32), "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)


@pytest.fixture(scope="module", params=[0, 1, 2])
def graphs(request, tmp_path_factory):
    """(float model, 8-bit Q/DQ model, widened Q/DQ model, pass detail, a held-out feed)."""
    folder = tmp_path_factory.mktemp(f"wide{request.param}")
    src = save_with_external_data(_conv_out_model(request.param), folder / "float.onnx")
    rng = np.random.default_rng(request.param)
    feeds = [{"x": (lambda a: a / (1 + np.exp(-a)))(rng.standard_normal((2, 32, 16, 16)) * 1.5).astype(np.float32)}
             for _ in range(5)]  # SiLU outputs, as a conv_out reads
    ranges = observed_ranges(src, feeds[:4])
    paths, ctx = [], PassContext()
    for wide in (False, True):
        graph = load_graph(src)
        PassManager([InferShapes(), InsertQDQEverywhere(ranges, QNN_W8A8_CAPS),
                     *([WideGraphOutputs(QNN_W8A8_CAPS)] if wide else []), InferShapes()]).run(graph, ctx)
        paths.append(save_graph(graph, folder / f"q{int(wide)}.onnx"))
    detail = next(e.detail for e in ctx.log if e.name == "wide-graph-outputs")
    return src, paths[0], paths[1], detail, feeds[4]


def _output_qparams(graph):
    q = graph.outputs[0].inputs[0].inputs[0].inputs[0]
    return float(constant_values(q.inputs[1])), constant_values(q.inputs[2])


def test_output_op_computes_at_16_bits_over_the_same_grid(graphs):
    _, narrow_path, wide_path, detail, _ = graphs
    narrow, wide = load_graph(narrow_path), load_graph(wide_path)
    assert detail == "1 output op(s) at uint16: conv_out" and wide.opset == 21
    (s8, z8), (s16, z16) = _output_qparams(narrow), _output_qparams(wide)
    assert z8.dtype == np.uint8 and z16.dtype == np.uint16 and int(z16) == 257 * int(z8)
    assert s16 == pytest.approx(s8 / 257, rel=1e-6)
    conv = next(n for n in wide.nodes if n.op == "Conv")
    # the Transpose between conv and output widened too: the conv's own output pair is uint16
    assert constant_values(conv.outputs[0].outputs[0].inputs[2]).dtype == np.uint16
    convert_q = conv.inputs[0].inputs[0].inputs[0].inputs[0]  # Conv <- DQ16 <- Q16 <- the input's DQ8
    assert convert_q.op == "QuantizeLinear" and convert_q.inputs[0].inputs[0].op == "DequantizeLinear"
    assert constant_values(convert_q.inputs[2]).dtype == np.uint16
    narrow_bias = constant_values(next(n for n in narrow.nodes if n.op == "Conv").inputs[2].inputs[0].inputs[0])
    wide_bias = constant_values(conv.inputs[2].inputs[0].inputs[0])
    assert wide_bias.dtype == np.int32 and np.array_equal(wide_bias, 257 * narrow_bias.astype(np.int64))


def test_widened_output_is_the_8_bit_one_without_its_last_rounding(graphs):
    src, narrow_path, wide_path, _, feed = graphs
    s8, _ = _output_qparams(load_graph(narrow_path))
    fp32 = make_session(src).run(None, feed)[0]
    narrow = make_session(narrow_path, optimize=False).run(None, feed)[0]
    wide = make_session(wide_path, optimize=False).run(None, feed)[0]
    assert np.abs(wide - narrow).max() <= 0.5 * s8 * (1 + 1 / 257) + 1e-6
    assert sqnr_db(fp32, wide) > sqnr_db(fp32, narrow) + 0.5  # measured +1.1 to +1.7 dB over seeds 0-2


def test_htp_runs_the_widened_graph_closer_to_the_cpu_ep(graphs):
    require_htp()
    from qcompile.targets.qnn import ep

    _, narrow_path, wide_path, _, feed = graphs
    agreement = []
    for path in (narrow_path, wide_path):
        htp = ep.htp_session(path).run(None, feed)[0]  # CPU fallback is off: a refused node fails here
        agreement.append(sqnr_db(make_session(path, optimize=False).run(None, feed)[0], htp))
    # measured 42.2 / 44.6 / 41.5 dB at 8 bits, 51.0 / 54.4 / 51.6 widened (seeds 0-2)
    assert agreement[1] > 48.0 and agreement[1] > agreement[0] + 5.0


def test_w8a16_outputs_are_left_alone(tmp_path):
    graph = load_graph(save_with_external_data(_conv_out_model(0), tmp_path / "float.onnx"))
    result = WideGraphOutputs(QNN_W8A16_CAPS).run(graph, PassContext())
    assert not result.modified and result.detail == "outputs stay uint16"
