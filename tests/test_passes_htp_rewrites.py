"""The rewrites the QNN target applies before quantizing are exact in float: Einsum as Transpose,
DiT's unpatchify as DepthToSpace, MatMul + bias as Gemm (on real tiny DiT / SD UNet exports)."""

from __future__ import annotations

import numpy as np
import pytest
from graphs import canonical_export

from qcompile.graph_io import load_graph, save_graph
from qcompile.models.source import resolve_model
from qcompile.pass_manager import PassContext, PassManager
from qcompile.passes.einsum_as_transpose import EinsumAsTranspose, permutation
from qcompile.passes.infer_shapes import InferShapes
from qcompile.passes.linear_as_gemm import LinearAsGemm
from qcompile.passes.static_shapes import StaticShapes
from qcompile.passes.unpatchify_depth_to_space import UnpatchifyAsDepthToSpace
from qcompile.runtime import make_session


def test_permutation_reads_only_pure_permutations():
    assert permutation("nhwpqc->nchpwq") == [0, 5, 1, 3, 2, 4]
    assert permutation("ij,jk->ik") is None and permutation("ii->i") is None and permutation("...ij->...ji") is None


@pytest.mark.parametrize(("model", "expected"), [
    ("tiny-dit", {"einsum-as-transpose": "1 Einsum as Transpose",
                  "unpatchify-as-depth-to-space": "1 unpatchify as DepthToSpace"}),
    ("tiny-sd-unet", {"linear-as-gemm": None}),
])
def test_rewrites_keep_the_output(model, expected, tmp_path_factory, tmp_path):
    src = canonical_export(model, tmp_path_factory)
    graph = load_graph(src)
    ctx = PassContext()
    PassManager([StaticShapes(2), EinsumAsTranspose(), InferShapes(), UnpatchifyAsDepthToSpace(), LinearAsGemm(),
                 InferShapes()]).run(graph, ctx)
    details = {e.name: e.detail for e in ctx.log}
    for name, detail in expected.items():
        assert details[name] == detail if detail else details[name].endswith("MatMul + bias as Gemm")
    ops = [n.op for n in graph.nodes]
    assert "Einsum" not in ops
    if model == "tiny-sd-unet":
        assert ops.count("Gemm") > 10 and all(len(n.outputs[0].shape) == 2 for n in graph.nodes if n.op == "Gemm")
    else:
        assert "DepthToSpace" in ops and max(len(t.shape or ()) for t in graph.tensors().values()) <= 5
    feed = resolve_model(f"builtin:{model}").synthetic_inputs([700.0, 30.0], seed=2)
    want = make_session(src).run(None, feed)[0]
    got = make_session(save_graph(graph, tmp_path / "out.onnx")).run(None, feed)[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
