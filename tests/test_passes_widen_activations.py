"""Integer-only mixed precision: chosen activations at 16 bits, the ops around them A16W8, Converts where
an 8-bit and a 16-bit op meet. Checked on the CPU EP (precision gained where the graph is wide) and on
the HTP simulator (runs whole, every op of one width, agrees with the CPU EP)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from graphs import observed_ranges, save_with_external_data
from onnx import TensorProto, helper, numpy_helper
from qnn_helpers import require_htp

from qcompile.evaluation.metrics import sqnr_db
from qcompile.graph_io import load_graph, save_graph
from qcompile.pass_manager import PassContext, PassManager
from qcompile.passes.infer_shapes import InferShapes
from qcompile.passes.insert_qdq_integer import InsertQDQEverywhere
from qcompile.passes.widen_activations import WidenActivations
from qcompile.runtime import make_session
from qcompile.targets.qnn.caps import QNN_W8A8_CAPS

C = 16


def _model(seed: int = 0) -> onnx.ModelProto:
    """x -> Conv(+bias) -> Relu -> Conv -> Add(skip from the Relu) -> Reshape -> Reshape -> Conv -> y."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array((rng.standard_normal((C, C if i else 4, 3, 3)) * 0.2).astype(np.float32),
                                     f"w{i}") for i in range(3)]
    inits += [numpy_helper.from_array((rng.standard_normal(C) * 0.1).astype(np.float32), "b0"),
              numpy_helper.from_array(np.array([2, C, 64], np.int64), "flat"),
              numpy_helper.from_array(np.array([2, C, 8, 8], np.int64), "square")]
    nodes = [helper.make_node("Conv", ["x", "w0", "b0"], ["c1"], "conv1", pads=[1] * 4),
             helper.make_node("Relu", ["c1"], ["r1"], "relu1"),
             helper.make_node("Conv", ["r1", "w1"], ["c2"], "conv2", pads=[1] * 4),
             helper.make_node("Add", ["c2", "r1"], ["a"], "add"),
             helper.make_node("Reshape", ["a", "flat"], ["af"], "flatten"),
             helper.make_node("Reshape", ["af", "square"], ["a2"], "unflatten"),
             helper.make_node("Conv", ["a2", "w2"], ["y"], "conv3", pads=[1] * 4)]
    graph = helper.make_graph(nodes, "widen", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, C, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("widen")
    src = save_with_external_data(_model(), tmp / "float.onnx")
    rng = np.random.default_rng(1)
    feeds = [{"x": rng.standard_normal((2, 4, 8, 8)).astype(np.float32)} for _ in range(4)]
    return tmp, src, feeds, observed_ranges(src, feeds)


def _quantize(setup, name: str, wide: tuple[str, ...]):
    tmp, src, _, ranges = setup
    graph = load_graph(src)
    passes = [InferShapes(), InsertQDQEverywhere(ranges, QNN_W8A8_CAPS), WidenActivations(wide, QNN_W8A8_CAPS),
              InferShapes()]
    ctx = PassContext()
    PassManager(passes).run(graph, ctx)
    return save_graph(graph, tmp / f"{name}.onnx"), graph, ctx.log[-2].detail


def _widths(graph) -> dict[str, set[int]]:
    """Per compute op, the bit widths of the activations it reads (through DequantizeLinear) and writes
    (through QuantizeLinear)."""
    out = {}
    for node in graph.nodes:
        if node.op in ("QuantizeLinear", "DequantizeLinear"):
            continue
        bits = set()
        for t in node.inputs:
            dq = t.inputs[0] if t.inputs else None
            if dq is not None and dq.op == "DequantizeLinear" and dq.inputs[0].inputs:  # an activation, not a constant
                bits.add(np.dtype(dq.inputs[2].values.dtype).itemsize * 8)
        for t in node.outputs:
            bits |= {np.dtype(q.inputs[2].values.dtype).itemsize * 8 for q in t.outputs if q.op == "QuantizeLinear"}
        out[node.name] = bits
    return out


def test_widened_tensors_make_their_ops_wide_with_converts_at_the_border(setup):
    path, graph, detail = _quantize(setup, "wide", ("conv2",))
    widths = _widths(graph)
    # conv2's activations r1 and c2 at 16 bits: relu1 (computes r1), conv2 and add (read them) are A16;
    # conv1 is not (c1 reaches relu1 through a Convert up)
    assert widths["relu1"] == widths["conv2"] == widths["add"] == {16} and widths["conv1"] == {8}
    # every op reads and writes one width; the Reshapes carry add's width; conv3 stays 8-bit behind a Convert
    assert all(len(bits) == 1 for bits in widths.values()), widths
    assert widths["flatten"] == widths["unflatten"] == {16} and widths["conv3"] == {8}
    # r1, c2, a, af, a2 stored at 16 bits; c1 converted up for relu1, a2 down for conv3
    assert detail == "5 activations at uint16, 3 ops A16, 2 converts", detail


def test_wide_graph_is_closer_to_float_on_the_cpu_ep(setup):
    tmp, src, feeds, _ = setup
    narrow, _, _ = _quantize(setup, "q8b", ())
    wide, _, _ = _quantize(setup, "wideb", ("conv1", "conv2"))
    ref = [make_session(src).run(None, f)[0] for f in feeds]
    s8 = sqnr_db(np.concatenate(ref), np.concatenate([make_session(narrow).run(None, f)[0] for f in feeds]))
    s16 = sqnr_db(np.concatenate(ref), np.concatenate([make_session(wide).run(None, f)[0] for f in feeds]))
    # conv1 ... add at 16 bits: only x and conv3's 8-bit input remain coarse
    assert s16 > s8 + 2.0, (s8, s16)


def test_mixed_graph_runs_whole_on_htp_and_agrees_with_the_cpu_ep(setup):
    require_htp()
    from qcompile.targets.qnn import ep

    _, _, feeds, _ = setup
    wide, _, _ = _quantize(setup, "widec", ("conv1", "conv2"))
    got = ep.htp_session(wide).run(None, feeds[0])[0]  # CPU fallback disabled: refuses any node it cannot take
    want = make_session(wide, optimize=False).run(None, feeds[0])[0]
    assert sqnr_db(want, got) > 35, sqnr_db(want, got)
