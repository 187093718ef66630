"""Per-op lowering of Q/DQ graphs: the LiteRT int8 kernels agree with onnxruntime running the same Q/DQ
graph to within 1 LSB of the output scale, and the op really ran in int8 (not a float fallback).

Graphs are written by hand with explicit QuantizeLinear/DequantizeLinear pairs: int8 asymmetric
activations, int8 symmetric per-channel weights, int32 biases with scale s_in * s_w (the TFLite spec).
The output scale comes from the range the same graph produces without its output Q/DQ.
"""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qcompile.graph_io import load_graph
from qcompile.pass_manager import PassContext, PassManager
from qcompile.passes.static_shapes import StaticShapes
from qcompile.quant import QParams, QuantDType, TensorRange, activation_qparams, quantize, weight_qparams
from qcompile.runtime import make_session
from qcompile.target import CompiledBucket
from qcompile.targets.tflite.inspect import operators
from qcompile.targets.tflite.options import TfliteOptions
from qcompile.targets.tflite.target import TfliteInt8Target
from qcompile.targets.tflite.validate import lsb_agreement

pytest.importorskip("ai_edge_litert.interpreter", reason="ai-edge-litert is not installed")


RNG = np.random.default_rng(0)
FIXED_1_256 = QParams(np.float32(1 / 256), np.int8(-128), QuantDType.INT8)


class QdqGraph:
    """A small graph under construction, with helpers that add Q/DQ pairs and quantized constants."""

    def __init__(self, inputs):
        self.inputs = inputs  # {name: shape}
        self.nodes, self.inits = [], {}

    def node(self, op, inputs, output, **attrs):
        self.nodes.append(helper.make_node(op, inputs, [output], **attrs))
        return output

    def qdq(self, t, qp: QParams):
        self.inits[f"{t}_s"], self.inits[f"{t}_z"] = np.float32(qp.scale), np.int8(qp.zero_point)
        self.node("QuantizeLinear", [t, f"{t}_s", f"{t}_z"], f"{t}_q")
        return self.node("DequantizeLinear", [f"{t}_q", f"{t}_s", f"{t}_z"], f"{t}_dq")

    def act(self, t):
        """Input `t` quantized with the range of its test data (once, however often it is read)."""
        if f"{t}_s" in self.inits:
            return f"{t}_dq"
        return self.qdq(t, _input_qp())

    def weight(self, name, w, axis):
        qp = weight_qparams(w, axis, QuantDType.INT8)
        self.inits[name], self.inits[f"{name}_s"] = quantize(w, qp, symmetric_range=True), qp.scale
        self.inits[f"{name}_z"] = np.zeros(qp.scale.shape, np.int8)
        self.node("DequantizeLinear", [name, f"{name}_s", f"{name}_z"], f"{name}_dq", axis=axis)
        return f"{name}_dq", qp

    def bias(self, name, b, in_qp: QParams, w_qp: QParams):
        scale = (np.float32(in_qp.scale) * w_qp.scale).astype(np.float32)
        self.inits[name] = np.rint(b / scale).astype(np.int32)
        self.inits[f"{name}_s"], self.inits[f"{name}_z"] = scale, np.zeros(scale.shape, np.int32)
        return self.node("DequantizeLinear", [name, f"{name}_s", f"{name}_z"], f"{name}_dq", axis=0)

    def model(self, output):
        graph = helper.make_graph(
            self.nodes, "case",
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in self.inputs.items()],
            [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)],
            [numpy_helper.from_array(np.asarray(v), k) for k, v in self.inits.items()])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)


def _input_qp():
    return activation_qparams(TensorRange(-3.0, 3.5), QuantDType.INT8, symmetric=False)


def int8_case(build, tmp_path, fixed_out: QParams | None = None):
    """`build(g)` adds the op under test to QdqGraph `g` and returns its float output tensor name."""
    feed = {}

    def make(out_qp):
        g = QdqGraph(dict(INPUTS))
        out = build(g)
        return g.model(g.qdq(out, out_qp) if out_qp is not None else out)

    for name, shape in INPUTS.items():
        feed[name] = np.clip(RNG.standard_normal(shape), -3.0, 3.5).astype(np.float32)
    path = tmp_path / "q.onnx"
    onnx.save(make(None), str(path))
    y = make_session(path).run(None, feed)[0]
    out_qp = fixed_out or activation_qparams(TensorRange(float(y.min()), float(y.max())), QuantDType.INT8,
                                             symmetric=False)
    onnx.save(make(out_qp), str(path))
    ref = make_session(path).run(None, feed)[0]
    graph = load_graph(path)
    PassManager([StaticShapes(batch=2)]).run(graph, PassContext())
    [[name]] = TfliteInt8Target(TfliteOptions(batch=2)).emit([CompiledBucket(0, graph)], tmp_path).bucket_files
    from qcompile.targets.tflite.runner import TfliteRunner

    got = TfliteRunner([tmp_path / name]).run(feed)
    agreement = lsb_agreement(ref, got, float(out_qp.scale))
    print(f"LSB agreement: {agreement.as_dict()}")
    assert agreement.max_lsb <= 1.0 + 1e-3, agreement
    return {(op.code, op.input_types[0]) for op in operators(tmp_path / name)}, agreement


INPUTS = {"x": [2, 4, 8, 8]}


@pytest.mark.parametrize("attrs,depthwise", [({"pads": [1, 1, 1, 1]}, False),
                                              ({"pads": [1, 1, 1, 1], "strides": [2, 2]}, False),
                                              ({"pads": [1, 1, 1, 1], "group": 4}, True)])
def test_conv_int8(attrs, depthwise, tmp_path):
    def build(g):
        x = g.act("x")
        w, w_qp = g.weight("w", RNG.standard_normal((8, 1 if depthwise else 4, 3, 3)).astype(np.float32) * 0.3, 0)
        b = g.bias("b", RNG.standard_normal(8).astype(np.float32) * 0.1, _input_qp(), w_qp)
        return g.node("Conv", [x, w, b], "y", kernel_shape=[3, 3], **attrs)

    ops, _ = int8_case(build, tmp_path)
    assert ("DEPTHWISE_CONV_2D" if depthwise else "CONV_2D", "INT8") in ops


def test_fully_connected_and_gemm_int8(tmp_path, monkeypatch):
    monkeypatch.delitem(INPUTS, "x")
    monkeypatch.setitem(INPUTS, "t", [2, 6, 16])

    def build(g):
        t = g.act("t")
        w, _ = g.weight("w", RNG.standard_normal((16, 12)).astype(np.float32) * 0.3, 1)  # MatMul [K, N]
        h = g.qdq(g.node("MatMul", [t, w], "h"), activation_qparams(TensorRange(-6, 6), QuantDType.INT8,
                                                                      symmetric=False))
        flat = g.node("Reshape", [h, "shape"], "flat")
        g.inits["shape"] = np.array([2, 72], np.int64)
        w2, w2_qp = g.weight("w2", RNG.standard_normal((5, 72)).astype(np.float32) * 0.1, 0)  # Gemm transB
        h_qp = activation_qparams(TensorRange(-6, 6), QuantDType.INT8, symmetric=False)
        b2 = g.bias("b2", RNG.standard_normal(5).astype(np.float32), h_qp, w2_qp)
        return g.node("Gemm", [flat, w2, b2], "y", transB=1)

    ops, _ = int8_case(build, tmp_path)
    assert ("FULLY_CONNECTED", "INT8") in ops and ("RESHAPE", "INT8") in ops


def test_batch_matmul_int8_with_transposed_operand(tmp_path, monkeypatch):
    monkeypatch.delitem(INPUTS, "x")
    monkeypatch.setitem(INPUTS, "a", [2, 5, 4])  # rank 3: graph inputs of rank 4 are taken to be images (NHWC)
    monkeypatch.setitem(INPUTS, "b", [2, 5, 4])

    def build(g):
        bt = g.node("Transpose", [g.act("b")], "bt", perm=[0, 2, 1])
        return g.node("MatMul", [g.act("a"), bt], "y")

    ops, _ = int8_case(build, tmp_path)
    assert ("BATCH_MATMUL", "INT8") in ops and not any(code == "TRANSPOSE" for code, _ in ops)


@pytest.mark.parametrize("op,fixed,int8_kernel", [("Sigmoid", FIXED_1_256, True), ("Sigmoid", None, False),
                                                  ("Softmax", FIXED_1_256, True), ("Gelu", None, True),
                                                  ("Tanh", QParams(np.float32(1 / 128), np.int8(0), QuantDType.INT8),
                                                   True)])
def test_activation_int8_with_fixed_output_params(op, fixed, int8_kernel, tmp_path):
    code = {"Sigmoid": "LOGISTIC", "Softmax": "SOFTMAX", "Gelu": "GELU", "Tanh": "TANH"}[op]
    ops, _ = int8_case(lambda g: g.node(op, [g.act("x")], "y"), tmp_path, fixed)
    # Without the fixed parameters LOGISTIC's int8 kernel refuses the tensor: it runs in float instead.
    assert ((code, "INT8") in ops) == int8_kernel and ((code, "FLOAT32") in ops) != int8_kernel


def test_add_mul_int8(tmp_path, monkeypatch):
    monkeypatch.setitem(INPUTS, "z", [2, 4, 8, 8])

    def build(g):
        s = g.qdq(g.node("Add", [g.act("x"), g.act("z")], "s"),
                  activation_qparams(TensorRange(-6.5, 7), QuantDType.INT8, symmetric=False))
        return g.node("Mul", [s, g.act("z")], "y")

    ops, _ = int8_case(build, tmp_path)
    assert ("ADD", "INT8") in ops and ("MUL", "INT8") in ops


def test_data_movement_runs_on_int8_exactly(tmp_path):
    def build(g):
        x = g.act("x")
        up = g.node("Resize", [x, "", "scales"], "up", mode="nearest", coordinate_transformation_mode="asymmetric",
                    nearest_mode="floor")
        g.inits["scales"] = np.array([1, 1, 2, 2], np.float32)
        pooled = g.node("MaxPool", [up], "pool", kernel_shape=[2, 2], strides=[2, 2])
        cat = g.node("Concat", [pooled, x], "cat", axis=1)
        return g.node("Transpose", [cat], "y", perm=[0, 2, 1, 3])

    ops, agreement = int8_case(build, tmp_path, fixed_out=_input_qp())
    assert agreement.max_lsb == 0.0
    assert {("RESIZE_NEAREST_NEIGHBOR", "INT8"), ("MAX_POOL_2D", "INT8"), ("CONCATENATION", "INT8")} <= ops


def test_concat_of_different_scales_is_requantized(tmp_path):
    def build(g):
        a = g.act("x")
        b = g.qdq(g.node("Mul", [a, "two"], "m"), activation_qparams(TensorRange(-6, 7), QuantDType.INT8,
                                                                      symmetric=False))
        g.inits["two"] = np.float32(2.0)
        return g.node("Concat", [a, b], "y", axis=1)

    ops, _ = int8_case(build, tmp_path)
    assert ("CONCATENATION", "INT8") in ops and ("QUANTIZE", "INT8") in ops


def test_reduce_mean_int8(tmp_path):
    def build(g):
        g.inits["axes"] = np.array([2, 3], np.int64)
        return g.node("ReduceMean", [g.act("x"), "axes"], "y", keepdims=1)

    ops, _ = int8_case(build, tmp_path)
    assert ("MEAN", "INT8") in ops
