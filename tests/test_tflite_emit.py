"""The flatbuffer writer: real files read back by the LiteRT interpreter (skipped without ai-edge-litert)."""

import numpy as np
import pytest

from qcompile.errors import UserError
from qcompile.targets.tflite import emit
from qcompile.targets.tflite.builder import ModelBuilder, Quant, Signature
from qcompile.targets.tflite.inspect import operators
from qcompile.targets.tflite.runner import read_metadata

litert = pytest.importorskip("ai_edge_litert.interpreter", reason="ai-edge-litert is not installed")


K, N = 256, 64  # 16 KiB of int8 weights


def _fc_model(subgraphs: int = 1, seed: int = 0, same_scales: bool = False) -> ModelBuilder:
    """x[2, K] float -> QUANTIZE -> FULLY_CONNECTED int8 (per-channel weights, int32 bias) -> DEQUANTIZE.

    Each subgraph has its own activation scales (a timestep bucket) and the same weights.
    """
    rng = np.random.default_rng(seed)
    w = rng.integers(-127, 128, (N, K)).astype(np.int8)
    w_scale = rng.uniform(0.001, 0.002, N)
    model = ModelBuilder()
    for k in range(subgraphs):
        step = 1 if same_scales else k + 1
        in_q, out_q = Quant.per_tensor(0.05 * step, 3), Quant.per_tensor(0.2 * step, -5)
        sg = model.add_subgraph(f"bucket_{k}")
        x = sg.add_tensor("x", (2, K), np.float32)
        xq = sg.add_tensor("x_q", (2, K), np.int8, in_q)
        wt = model.constant(sg, "w", w, Quant.of(w_scale, np.zeros(N), 0))
        bias_q = Quant.of(np.float32(in_q.scale[0]) * w_scale.astype(np.float32), np.zeros(N), 0)
        bt = model.constant(sg, "b", np.arange(N, dtype=np.int32) * 10, bias_q)
        yq = sg.add_tensor("y_q", (2, N), np.int8, out_q)
        y = sg.add_tensor("y", (2, N), np.float32)
        sg.add_op("QUANTIZE", [x], [xq])
        sg.add_op("FULLY_CONNECTED", [xq, wt, bt], [yq], "FullyConnectedOptions")
        sg.add_op("DEQUANTIZE", [yq], [y])
        sg.inputs, sg.outputs = [x], [y]
        model.signatures.append(Signature(f"bucket_{k}", k, [("x", x)], [("y", y)]))
    emit.set_metadata(model, {"format": 1, "note": "test"})
    return model


def _reference(x, k, seed=0):
    """The integer FC in numpy: quantize, int32 accumulate, rescale, round."""
    rng = np.random.default_rng(seed)
    w = rng.integers(-127, 128, (N, K)).astype(np.int64)
    w_scale = rng.uniform(0.001, 0.002, N)
    s_in, s_out = np.float32(0.05 * (k + 1)), 0.2 * (k + 1)
    xq = np.clip(np.round(x / s_in) + 3, -128, 127).astype(np.int64) - 3
    acc = xq @ w.T + np.arange(N) * 10
    yq = np.clip(np.round(acc * (s_in * np.float32(w_scale)) / s_out) - 5, -128, 127)
    return (yq + 5) * s_out


def _run(data: bytes, key: str, x: np.ndarray) -> np.ndarray:
    interpreter = litert.Interpreter(model_content=data, num_threads=2)
    return interpreter.get_signature_runner(key)(x=x)["y"]


@pytest.mark.parametrize("external", [False, True])
def test_int8_fc_matches_integer_reference_inline_and_external(external):
    data = emit.serialize(_fc_model(), external_data=external)
    x = np.random.default_rng(1).standard_normal((2, K)).astype(np.float32)
    got = _run(data, "bucket_0", x)
    np.testing.assert_allclose(got, _reference(x, 0), atol=0.2 + 1e-6)  # within one output step
    assert read_metadata(data)["note"] == "test"


def test_buckets_share_weight_buffers_and_run_separately():
    one, two = emit.serialize(_fc_model(1)), emit.serialize(_fc_model(2))
    # The second bucket adds what differs (its bias values and bias scales, 4 bytes per channel each)
    # and a few tables for its activations, not a copy of the weights or of the shared tables.
    assert len(two) - len(one) <= 2 * 4 * N + 128
    x = np.random.default_rng(2).standard_normal((2, K)).astype(np.float32)
    interpreter = litert.Interpreter(model_content=two, num_threads=2)
    assert set(interpreter.get_signature_list()) == {"bucket_0", "bucket_1"}
    for k in (0, 1):
        np.testing.assert_allclose(_run(two, f"bucket_{k}", x), _reference(x, k), atol=0.2 * (k + 1) + 1e-6)


def test_an_identical_bucket_costs_only_its_offset_vectors():
    """Tables, vectors and strings are written once per content: a second subgraph equal to the first
    costs its own SubGraph table, signature and offset vectors, whatever the size of its tables."""
    one, two = emit.serialize(_fc_model(1, same_scales=True)), emit.serialize(_fc_model(2, same_scales=True))
    assert len(two) - len(one) <= 256
    x = np.random.default_rng(3).standard_normal((2, K)).astype(np.float32)
    np.testing.assert_array_equal(_run(two, "bucket_1", x), _run(one, "bucket_0", x))


def test_buffers_are_aligned_and_versions_follow_the_types():
    data = emit.serialize(_fc_model())
    from ai_edge_litert import schema_py_generated as S

    model = S.Model.GetRootAs(data, 0)
    for i in range(model.BuffersLength()):
        buf = model.Buffers(i)
        if buf.DataLength():
            offset = buf._tab.Vector(buf._tab.Offset(4))
            assert offset % emit.BUFFER_ALIGN == 0
    versions = {op.code: op.version for op in operators(data)}
    assert versions == {"QUANTIZE": 1, "FULLY_CONNECTED": 4, "DEQUANTIZE": 2}


def test_weights_past_the_flatbuffer_limit(monkeypatch):
    model = _fc_model()
    monkeypatch.setattr(emit, "FLATBUFFER_LIMIT", 1000)
    monkeypatch.setattr(emit, "TABLE_MARGIN", 990)
    with pytest.raises(UserError, match="flatbuffer limit of 1000 bytes"):
        emit.serialize(model, external_data=False)
    with pytest.raises(UserError, match="tables exceed the flatbuffer limit"):
        emit.serialize(model)  # weights would go outside, but the tables alone are over this tiny limit
    monkeypatch.setattr(emit, "FLATBUFFER_LIMIT", 4000)
    monkeypatch.setattr(emit, "TABLE_MARGIN", 3000)
    data = emit.serialize(model)  # auto: the weights go after the flatbuffer
    x = np.ones((2, K), np.float32)
    np.testing.assert_allclose(_run(data, "bucket_0", x), _reference(x, 0), atol=0.2 + 1e-6)


def test_external_weights_stream_to_the_file(tmp_path):
    """write_tflite writes the bytes serialize() returns, without holding the file in memory: with
    the weights after the flatbuffer (how a model past 2 GiB is written) the memory it allocates stays
    far under the weights' size, and the LiteRT interpreter loads the file from disk."""
    import tracemalloc

    model = _fc_model()
    rng = np.random.default_rng(4)
    for i in range(4):  # 16 MiB of further weights in four buffers (read by nothing: size, not arithmetic)
        model.constant(model.subgraphs[0], f"extra_{i}", rng.integers(-127, 128, (1024, 4096)).astype(np.int8))
    tracemalloc.start()
    try:
        path = emit.write_tflite(model, tmp_path / "model.tflite", external_data=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert model.data_bytes > 16 << 20
    assert peak < model.data_bytes / 8, f"writing allocated {peak} bytes for {model.data_bytes} bytes of weights"
    assert path.read_bytes() == emit.serialize(model, external_data=True)
    x = np.random.default_rng(5).standard_normal((2, K)).astype(np.float32)
    interpreter = litert.Interpreter(model_path=str(path), num_threads=2)
    got = interpreter.get_signature_runner("bucket_0")(x=x)["y"]
    np.testing.assert_allclose(got, _reference(x, 0), atol=0.2 + 1e-6)


def test_with_outputs_keeps_the_named_tensors_readable():
    """The device check's probe: a copy whose subgraph also outputs an intermediate int8 tensor, which
    the interpreter (no preserve-all) then holds after a run, with the same result as the original."""
    data = emit.serialize(_fc_model())
    probe = emit.with_outputs(data, 0, [1])  # tensor 1: x_q, the QUANTIZE output
    x = np.random.default_rng(6).standard_normal((2, K)).astype(np.float32)
    interpreter = litert.Interpreter(model_content=probe, num_threads=2)
    got = interpreter.get_signature_runner("bucket_0")(x=x)["y"]
    np.testing.assert_array_equal(got, _run(data, "bucket_0", x))
    want_q = np.clip(np.round(x / np.float32(0.05)) + 3, -128, 127).astype(np.int8)
    np.testing.assert_array_equal(interpreter.get_tensor(1, 0), want_q)
