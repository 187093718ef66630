"""GroupNorm's affine as a depthwise 1x1 Conv: the same function in float, and the form HTP computes right."""

from __future__ import annotations

import numpy as np
from graphs import groupnorm_skip_model, observed_ranges, save_with_external_data
from qnn_helpers import quantize_float_model, require_htp

from qcompile.evaluation.metrics import cosine
from qcompile.graph_io import load_graph, save_graph
from qcompile.pass_manager import PassContext, PassManager
from qcompile.passes.groupnorm_affine_conv import GroupNormAffineAsConv
from qcompile.passes.infer_shapes import InferShapes
from qcompile.runtime import make_session


def _feeds(count=4, seed=0):
    rng = np.random.default_rng(seed)
    return [{"deep": rng.standard_normal((2, 32, 8, 8)).astype(np.float32) * 2,
             "skip": rng.standard_normal((2, 32, 8, 8)).astype(np.float32)} for _ in range(count)]


def test_affine_becomes_a_depthwise_conv_with_the_same_output(tmp_path):
    src = save_with_external_data(groupnorm_skip_model(), tmp_path / "float.onnx")
    graph = load_graph(src)
    ctx = PassContext()
    PassManager([InferShapes(), GroupNormAffineAsConv()]).run(graph, ctx)
    assert ctx.log[-1].detail == "1 GroupNorm affines as depthwise Conv"
    convs = [n for n in graph.nodes if n.op == "Conv"]
    depthwise = next(n for n in convs if n.attrs.get("group") == 64)
    assert depthwise.inputs[1].shape == (64, 1, 1, 1) and depthwise.outputs[0].name == "gn"
    assert [n.op for n in graph.nodes].count("Mul") == 1  # only SiLU's Mul is left
    feed = _feeds(1)[0]
    want = make_session(src).run(None, feed)[0]
    got = make_session(save_graph(graph, tmp_path / "out.onnx")).run(None, feed)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_htp_breaks_the_elementwise_affine_with_16_bit_constants_only(tmp_path):
    """The QNN HTP simulator (onnxruntime-qnn 2.7.0) computes GroupNorm's Mul(x, gamma[C,1,1]) -> SiLU
    after a skip Concat wrongly when gamma and beta are 16-bit constants (cosine 0.11 here), while
    the CPU EP runs the same Q/DQ graph right. The depthwise-Conv form, or 8-bit constants (the QNN
    caps' choice), both give the right answer. If a QNN release fixes it, the first assertion fails."""
    require_htp()
    from dataclasses import replace

    from qcompile.targets.qnn import ep
    from qcompile.targets.qnn.caps import QNN_W8A16_CAPS

    src = save_with_external_data(groupnorm_skip_model(), tmp_path / "float.onnx")
    feeds = _feeds()
    ranges = observed_ranges(src, feeds)
    want = make_session(src).run(None, feeds[0])[0]
    wide_constants = replace(QNN_W8A16_CAPS, constant_dtype=None)  # 16-bit, like the activations
    results = {}
    for label, caps, rewrite in (("mul16", wide_constants, False), ("conv16", wide_constants, True),
                                 ("mul8", QNN_W8A16_CAPS, False)):
        path = quantize_float_model(src, tmp_path / f"{label}.onnx", ranges, caps,
                                    [GroupNormAffineAsConv()] if rewrite else [])
        htp = ep.htp_session(path)
        runs = [htp.run(None, feeds[0])[0] for _ in range(3)]
        cpu = make_session(path).run(None, feeds[0])[0]
        results[label] = (cosine(want, runs[0]), cosine(want, cpu), all(np.array_equal(runs[0], r) for r in runs))
    assert results["mul16"][1] > 0.9999 and results["mul16"][0] < 0.5, results  # the HTP bug, CPU EP fine
    for label in ("conv16", "mul8"):
        assert results[label][0] > 0.9999 and results[label][1] > 0.9999 and results[label][2], results
