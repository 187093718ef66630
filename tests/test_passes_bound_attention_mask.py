"""BoundAttentionMask: a finite mask computes the same attention in float, and it is what makes an
integer-only graph of masked attention work at all (the sum of scores and -3.4e38 has no usable scale)."""

from __future__ import annotations

import numpy as np
import onnx
from graphs import observed_ranges, save_with_external_data
from onnx import TensorProto, helper, numpy_helper
from qnn_helpers import quantize_float_model

from qcompile.evaluation.metrics import sqnr_db
from qcompile.graph_io import constant_values, load_graph, save_graph
from qcompile.pass_manager import PassContext, PassManager
from qcompile.passes.bound_attention_mask import GAP, BoundAttentionMask, masked_softmax_sums
from qcompile.runtime import make_session
from qcompile.targets.qnn.caps import QNN_W8A16_CAPS

TOKENS, DIM = 8, 16


def _causal_attention(slope: float = 0.0) -> onnx.ModelProto:
    """Two self-attention layers sharing one causal mask of float32 minimum, as CLIP's export has it;
    with `slope`, the unblocked positions carry an ALiBi-style distance bias."""
    rng = np.random.default_rng(0)
    distance = np.abs(np.subtract.outer(np.arange(TOKENS), np.arange(TOKENS))).astype(np.float32)
    mask = np.where(np.triu(np.ones((TOKENS, TOKENS), bool), k=1), np.finfo(np.float32).min,
                    -slope * distance).astype(np.float32)
    inits = [numpy_helper.from_array(mask, "mask"), numpy_helper.from_array(np.float32(DIM ** -0.5), "scale")]
    inits += [numpy_helper.from_array(rng.standard_normal((DIM, DIM)).astype(np.float32) * 0.2, f"w{i}")
              for i in range(4)]
    nodes = []
    x = "x"
    for layer in range(2):
        p = f"l{layer}_"
        nodes += [helper.make_node("MatMul", [x, f"w{2 * layer}"], [p + "q"], p + "q_proj"),
                  helper.make_node("MatMul", [x, f"w{2 * layer + 1}"], [p + "k"], p + "k_proj"),
                  helper.make_node("Transpose", [p + "k"], [p + "kt"], p + "kt", perm=[0, 2, 1]),
                  helper.make_node("MatMul", [p + "q", p + "kt"], [p + "qk"], p + "qk"),
                  helper.make_node("Mul", [p + "qk", "scale"], [p + "scores"], p + "scaled"),
                  helper.make_node("Add", [p + "scores", "mask"], [p + "masked"], p + "add_mask"),
                  helper.make_node("Softmax", [p + "masked"], [p + "attn"], p + "softmax", axis=-1),
                  helper.make_node("MatMul", [p + "attn", p + "q"], [p + "out"], p + "mix")]
        x = p + "out"
    shape = [2, TOKENS, DIM]
    graph = helper.make_graph(nodes, "causal", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, shape)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def _feeds(count: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((2, TOKENS, DIM)).astype(np.float32)} for _ in range(count)]


def test_bounded_mask_computes_the_same_attention(tmp_path):
    src = save_with_external_data(_causal_attention(), tmp_path / "src.onnx")
    ranges = observed_ranges(src, _feeds(8, 0))
    graph = load_graph(src)
    assert len(masked_softmax_sums(graph)) == 2
    PassManager([BoundAttentionMask(ranges)]).run(graph, PassContext())
    adds = [n for n in graph.nodes if n.op == "Add"]
    for add in adds:  # one bounded copy per layer, sized by that layer's scores, under a new name
        scores = ranges[add.inputs[0].name]
        floor = float(constant_values(add.inputs[1]).min())
        assert floor == np.float32(-((scores.hi - scores.lo) + GAP))
        assert add.outputs[0].name.endswith("_bounded") and add.outputs[0].name not in ranges
    assert "mask" not in graph.tensors()
    out = save_graph(graph, tmp_path / "bounded.onnx")
    for feed in _feeds(4, 1):
        np.testing.assert_allclose(make_session(out).run(None, feed)[0], make_session(src).run(None, feed)[0],
                                   rtol=1e-5, atol=1e-5)


def test_integer_graph_needs_the_bound(tmp_path):
    src = save_with_external_data(_causal_attention(), tmp_path / "src.onnx")
    feeds = _feeds(8, 0)  # judged on the calibration inputs: the mask is on trial, not clipping
    ranges = observed_ranges(src, feeds)
    plain = quantize_float_model(src, tmp_path / "plain.onnx", ranges, QNN_W8A16_CAPS)
    bounded = quantize_float_model(src, tmp_path / "bounded.onnx", ranges, QNN_W8A16_CAPS,
                                   rewrites=(BoundAttentionMask(ranges),))
    want = np.concatenate([make_session(src).run(None, f)[0] for f in feeds])
    got_plain = np.concatenate([make_session(plain).run(None, f)[0] for f in feeds])
    got_bounded = np.concatenate([make_session(bounded).run(None, f)[0] for f in feeds])
    assert sqnr_db(want, got_plain) < 15  # uniform attention over the unblocked tokens
    assert sqnr_db(want, got_bounded) > 40  # 16-bit activations, 8-bit weights


def test_a_bias_beside_the_blocks_keeps_its_values(tmp_path):
    src = save_with_external_data(_causal_attention(slope=0.5), tmp_path / "src.onnx")
    ranges = observed_ranges(src, _feeds(8, 0))
    original = constant_values(load_graph(src).tensors()["mask"])
    graph = load_graph(src)
    PassManager([BoundAttentionMask(ranges)]).run(graph, PassContext())
    for add in (n for n in graph.nodes if n.op == "Add"):
        bounded = constant_values(add.inputs[1])
        blocked = original <= -1e4
        np.testing.assert_array_equal(bounded[~blocked], original[~blocked])
        scores = ranges[add.inputs[0].name]
        np.testing.assert_allclose(bounded[blocked], float(original[~blocked].min()) - (scores.hi - scores.lo) - GAP,
                                   rtol=1e-6)
    out = save_graph(graph, tmp_path / "bounded.onnx")
    for feed in _feeds(2, 1):
        np.testing.assert_allclose(make_session(out).run(None, feed)[0], make_session(src).run(None, feed)[0],
                                   rtol=1e-5, atol=1e-5)
