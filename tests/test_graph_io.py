import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from graphs import conv_mlp_model, run, save_with_external_data

from qcompile.errors import UserError
from qcompile.graph_io import ExternalValues, load_graph, node_meta, save_graph


@pytest.fixture
def model_path(tmp_path):
    folder = tmp_path / "src"
    folder.mkdir()
    return save_with_external_data(conv_mlp_model(), folder / "m.onnx")


def test_weights_stay_external_and_lazy(model_path, tmp_path):
    graph = load_graph(model_path)
    weights = [t for t in graph.tensors().values() if isinstance(t, gs.Constant) and t._values.nbytes >= 256]
    assert weights and all(isinstance(t._values, ExternalValues) for t in weights)
    out = save_graph(graph, tmp_path / "out" / "copy.onnx")
    proto = onnx.load(str(out), load_external_data=False)
    # Weights never enter the protobuf: every initializer over the inline limit is external.
    big = [t for t in proto.graph.initializer if np.prod(t.dims) * 4 >= 1024]
    assert big and all(t.data_location == onnx.TensorProto.EXTERNAL for t in big)
    assert out.stat().st_size < 4096
    x = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(run(model_path, {"x": x}), run(out, {"x": x}))


def test_save_over_the_source_keeps_weights_correct(model_path):
    x = np.random.default_rng(2).standard_normal((1, 3, 8, 8)).astype(np.float32)
    expected = run(model_path, {"x": x})
    graph = load_graph(model_path)  # untouched graph, saved in place twice
    save_graph(graph, model_path)
    save_graph(graph, model_path)
    np.testing.assert_array_equal(run(model_path, {"x": x}), expected)


def test_node_metadata_round_trips(model_path, tmp_path):
    graph = load_graph(model_path)
    node_meta(graph.nodes[0])["qcompile.module"] = "conv1"
    node_meta(graph.nodes[0])["pkg.torch.onnx.stack_trace"] = "long text"
    save_graph(graph, tmp_path / "m2.onnx")
    again = load_graph(tmp_path / "m2.onnx")
    assert node_meta(again.nodes[0]) == {"qcompile.module": "conv1"}


def test_missing_and_bad_files_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="no such ONNX file"):
        load_graph(tmp_path / "nope.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00not a model")
    with pytest.raises(UserError, match="not a readable ONNX model"):
        load_graph(bad)


def test_shape_inference_leaves_in_memory_weights_out_of_the_protobuf():
    """A pass's in-memory weights (int8 after Q/DQ insertion) are left out of the protobuf shape
    inference reads: an SDXL-size UNet's int8 weights pass the 2 GB protobuf limit. Shapes are the
    same as with the values, and the graph keeps its values."""
    from qcompile.graph_io import to_model_proto
    from qcompile.pass_manager import PassContext
    from qcompile.passes.infer_shapes import InferShapes

    x = gs.Variable("x", np.float32, (1, 64))
    w = gs.Constant("w", np.arange(64 * 512, dtype=np.int8).reshape(64, 512))
    small = gs.Constant("shape", np.array([1, 512], np.int64))
    wf, y, z = gs.Variable("wf", np.float32, None), gs.Variable("y", np.float32, None), gs.Variable("z")
    nodes = [gs.Node("Cast", inputs=[w], outputs=[wf], attrs={"to": onnx.TensorProto.FLOAT}),
             gs.Node("MatMul", inputs=[x, wf], outputs=[y]), gs.Node("Reshape", inputs=[y, small], outputs=[z])]
    graph = gs.Graph(nodes=nodes, inputs=[x], outputs=[z], opset=20)
    full, bare = to_model_proto(graph), to_model_proto(graph, weights=False)
    assert full.ByteSize() > w.values.nbytes > 100 * bare.ByteSize()
    assert isinstance(w._values, np.ndarray) and w.values[0, 1] == 1  # put back
    inline = {t.name: t for t in bare.graph.initializer}
    assert inline["shape"].raw_data or inline["shape"].int64_data  # shape-like constants keep their values
    InferShapes().run(graph, PassContext())
    assert y.shape == [1, 512] and z.shape == [1, 512] and wf.dtype == np.float32
