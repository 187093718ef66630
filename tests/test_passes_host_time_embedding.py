"""The timestep embedding cut out to the host: host graph + device graph compute the original model."""

from __future__ import annotations

import numpy as np
import pytest
from graphs import canonical_export

from qcompile.graph_io import load_graph, save_graph
from qcompile.models.source import resolve_model
from qcompile.pass_manager import PassContext, PassManager
from qcompile.passes.host_time_embedding import MoveTimeEmbeddingToHost, TimeEmbeddingCut
from qcompile.passes.static_shapes import StaticShapes
from qcompile.runtime import make_session

BATCH = 2


@pytest.fixture(scope="module")
def unet(tmp_path_factory):
    return canonical_export("tiny-sd-unet", tmp_path_factory)


def _feed():
    adapter = resolve_model("builtin:tiny-sd-unet")
    return adapter.synthetic_inputs([900.0, 15.0], seed=3)


@pytest.mark.parametrize("cut", [TimeEmbeddingCut.FULL, TimeEmbeddingCut.SINUSOID])
def test_host_and_device_graphs_compute_the_original(unet, tmp_path, cut):
    graph = load_graph(unet)
    move = MoveTimeEmbeddingToHost("timestep", cut)
    ctx = PassContext()
    PassManager([StaticShapes(BATCH), move]).run(graph, ctx)
    device = save_graph(graph, tmp_path / "device.onnx")
    host = save_graph(move.host_graph, tmp_path / "host.onnx")
    feed = _feed()
    want = make_session(unet).run(None, feed)[0]

    host_session = make_session(host)
    embeddings = dict(zip([o.name for o in host_session.get_outputs()],
                          host_session.run(None, {"timestep": feed["timestep"]}), strict=True))
    device_session = make_session(device)
    names = [i.name for i in device_session.get_inputs()]
    got = device_session.run(None, {n: feed[n] if n in feed else embeddings[n] for n in names})[0]

    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    ops = {n.op for n in graph.nodes}
    assert "Sin" not in ops and "Cos" not in ops  # the sinusoid is on the host in both cuts
    assert "timestep" not in names
    gemms_on_host = sum(n.op == "Gemm" for n in move.host_graph.nodes)
    if cut is TimeEmbeddingCut.FULL:
        assert gemms_on_host >= 3  # time MLP (2) + the resnets' time_emb_proj
        assert all(i.startswith("unsqueeze") or i in feed for i in names)
    else:
        assert gemms_on_host == 0 and len(embeddings) == 1  # only the sinusoidal projection moved


def test_cut_none_leaves_the_graph_alone(unet):
    graph = load_graph(unet)
    move = MoveTimeEmbeddingToHost("timestep", TimeEmbeddingCut.NONE)
    before = len(graph.nodes)
    assert not move.run(graph, PassContext()).modified
    assert move.host_graph is None and len(graph.nodes) == before


def test_device_graph_keeps_its_tensors_and_the_host_graph_is_separate(unet):
    graph = load_graph(unet)
    move = MoveTimeEmbeddingToHost("timestep")
    PassManager([StaticShapes(BATCH), move]).run(graph, PassContext())
    device_nodes = {id(n) for n in graph.nodes}
    host_tensors = move.host_graph.tensors()
    for name, tensor in graph.tensors().items():
        if name in host_tensors:
            assert tensor is not host_tensors[name]  # fresh objects: no consumer leaks across graphs
        assert all(id(c) in device_nodes for c in tensor.outputs)


def test_a_graph_without_the_input_is_refused(unet):
    from qcompile.errors import UserError

    with pytest.raises(UserError, match="no input 'time'"):
        MoveTimeEmbeddingToHost("time").run(load_graph(unet), PassContext())


def test_without_a_timestep_only_the_token_lookup_moves(tmp_path_factory, tmp_path):
    """A text encoder (tiny CLIP): every node depends on the token ids alone, so the timestep rule would
    move the whole model. Without a timestep only the integer ops and the embedding lookup move; the
    device reads the looked-up embeddings, and host + device compute the original."""
    clip = canonical_export("tiny-clip-text", tmp_path_factory)
    graph = load_graph(clip)
    move = MoveTimeEmbeddingToHost(None)
    PassManager([StaticShapes(BATCH), move]).run(graph, PassContext())
    assert [n.op for n in move.host_graph.nodes if n.op == "Gather"] == ["Gather"]
    assert not any(n.op in ("MatMul", "Gemm", "LayerNormalization", "Softmax") for n in move.host_graph.nodes)
    ids = np.random.default_rng(0).integers(0, 64, (BATCH, 16)).astype(np.int64)
    want = make_session(clip).run(None, {"input_ids": ids})[0]
    host = make_session(save_graph(move.host_graph, tmp_path / "host.onnx"))
    embedded = dict(zip([o.name for o in host.get_outputs()], host.run(None, {"input_ids": ids}), strict=True))
    device = make_session(save_graph(graph, tmp_path / "device.onnx"))
    names = [i.name for i in device.get_inputs()]
    assert "input_ids" not in names and all(np.asarray(embedded[n]).dtype.kind == "f" for n in names)
    np.testing.assert_allclose(device.run(None, {n: embedded[n] for n in names})[0], want, rtol=1e-5, atol=1e-5)


def test_flux_guidance_and_rotary_embedding_move_with_the_timestep(tmp_path_factory, tmp_path):
    """Flux: the guidance strength is embedded like the timestep (per-sample scalar) and the rotary
    embedding comes from the token ids (no batch axis); both leave the device, which then holds no
    Sin/Cos and no Expand (HTP refuses the rotary embedding's float64 Expand), and host + device
    compute the original."""
    flux = canonical_export("tiny-flux", tmp_path_factory)
    adapter = resolve_model("builtin:tiny-flux")
    feed = adapter.synthetic_inputs([900.0, 15.0], seed=3)
    graph = load_graph(flux)
    static = StaticShapes(BATCH)
    move = MoveTimeEmbeddingToHost("timestep", static_shapes=static)
    PassManager([static, move]).run(graph, PassContext())
    assert set(static.unbatched) == {"img_ids", "txt_ids"}
    host = make_session(save_graph(move.host_graph, tmp_path / "host.onnx"))
    host_inputs = {i.name for i in host.get_inputs()}
    assert {"timestep", "guidance", "img_ids", "txt_ids"} <= host_inputs
    embedded = dict(zip([o.name for o in host.get_outputs()], host.run(None, {n: feed[n] for n in host_inputs}),
                        strict=True))
    device = make_session(save_graph(graph, tmp_path / "device.onnx"))
    names = [i.name for i in device.get_inputs()]
    assert not {n.op for n in graph.nodes} & {"Sin", "Cos", "Expand"}
    got = device.run(None, {n: feed[n] if n in feed else embedded[n] for n in names})[0]
    np.testing.assert_allclose(got, make_session(flux).run(None, feed)[0], rtol=1e-4, atol=1e-4)
