"""Per-op lowering in float: each small graph runs in the LiteRT interpreter and in onnxruntime, and the
outputs agree (rtol 1e-4, atol 1e-5). Most graphs start with a Conv, so the op under test sees an
NHWC-stored activation and the layout bookkeeping is exercised too."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qcompile.errors import UserError
from qcompile.graph_io import load_graph
from qcompile.pass_manager import PassContext, PassManager
from qcompile.passes.fuse_groupnorm import FuseGroupNorm
from qcompile.passes.insert_qdq import QuantPlan
from qcompile.runtime import make_session
from qcompile.target import BucketJob, CompiledBucket
from qcompile.targets.tflite.inspect import operators
from qcompile.targets.tflite.options import TfliteOptions
from qcompile.targets.tflite.runner import TfliteRunner
from qcompile.targets.tflite.target import TfliteFp32Target

pytest.importorskip("ai_edge_litert.interpreter", reason="ai-edge-litert is not installed")


RNG = np.random.default_rng(0)
X = ("x", [2, 4, 6, 6])


def _arr(*shape, scale=0.5):
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def _value_info(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def _model(nodes, inits=(), inputs=(X,), out=("y", None), opset=20):
    graph = helper.make_graph(
        nodes, "case",
        [_value_info(*spec) for spec in inputs],
        [helper.make_tensor_value_info(out[0], TensorProto.FLOAT, out[1])],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in dict(inits).items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


def _conv_in(out="c"):
    """x -> 1x1 Conv: the op under test reads an NHWC-stored activation."""
    return [helper.make_node("Conv", ["x", "w0", "b0"], [out], "conv_in")], {"w0": _arr(4, 4, 1, 1), "b0": _arr(4)}


def lower_and_compare(model, tmp_path, feed=None, batch=2, without: type | None = None):
    """Lower through the target's pipeline (less the pass of type `without`) and compare with onnxruntime."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    feed = feed or {i.name: _arr(*[d.dim_value for d in i.type.tensor_type.shape.dim], scale=1.0)
                    for i in model.graph.input}
    target = TfliteFp32Target(TfliteOptions(batch=batch))
    graph = load_graph(path)
    job = BucketJob(0, QuantPlan((), (), (), ()), {}, None)
    PassManager([p for p in target.passes(job) if without is None or not isinstance(p, without)]).run(
        graph, PassContext())
    [[name]] = target.emit([CompiledBucket(0, graph)], tmp_path).bucket_files
    got = TfliteRunner([tmp_path / name]).run(feed)
    ref = make_session(path).run(None, feed)[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
    return [op.code for op in operators(tmp_path / name)]


CONV_CASES = {
    "same_3x3": dict(pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
    "stride2_explicit_pad": dict(pads=[1, 1, 1, 1], strides=[2, 2], kernel_shape=[3, 3]),
    "valid_dilated": dict(dilations=[2, 2], kernel_shape=[3, 3]),
    "asymmetric_pads": dict(pads=[0, 1, 2, 0], kernel_shape=[2, 2]),
}


@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_conv(case, tmp_path):
    attrs = CONV_CASES[case]
    kh, kw = attrs["kernel_shape"]
    model = _model([helper.make_node("Conv", ["x", "w", "b"], ["y"], **attrs)], {"w": _arr(5, 4, kh, kw), "b": _arr(5)})
    ops = lower_and_compare(model, tmp_path)
    assert "CONV_2D" in ops and "TRANSPOSE" not in ops  # NHWC at the API, nothing to convert inside


def test_depthwise_conv_with_multiplier(tmp_path):
    model = _model([helper.make_node("Conv", ["x", "w", "b"], ["y"], group=4, pads=[1, 1, 1, 1])],
                   {"w": _arr(8, 1, 3, 3), "b": _arr(8)})
    assert "DEPTHWISE_CONV_2D" in lower_and_compare(model, tmp_path)


def test_grouped_conv_is_refused_by_name(tmp_path):
    model = _model([helper.make_node("Conv", ["x", "w"], ["y"], "grouped", group=2)], {"w": _arr(4, 2, 1, 1)})
    with pytest.raises(UserError, match="grouped convolution.*node 'grouped'"):
        lower_and_compare(model, tmp_path)


def test_unsupported_op_names_op_and_node(tmp_path):
    model = _model([helper.make_node("HardSwish", ["x"], ["y"], "hs")])
    with pytest.raises(UserError, match="op HardSwish \\(node 'hs'\\)"):
        lower_and_compare(model, tmp_path)


def test_matmul_gemm_and_batch_matmul(tmp_path):
    tokens = ("t", [2, 5, 8])
    nodes = [
        helper.make_node("MatMul", ["t", "w1"], ["h"]),  # FULLY_CONNECTED, keep_num_dims
        helper.make_node("Transpose", ["h"], ["ht"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["h", "ht"], ["s"]),  # BATCH_MATMUL with adj_y
        helper.make_node("Softmax", ["s"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "h"], ["o"]),
        helper.make_node("Reshape", ["o", "flat"], ["f"]),
        helper.make_node("Gemm", ["f", "w2", "b2"], ["y"], transB=1, alpha=0.5, beta=2.0),
    ]
    inits = {"w1": _arr(8, 6), "flat": np.array([2, 30], np.int64), "w2": _arr(3, 30), "b2": _arr(3)}
    ops = lower_and_compare(_model(nodes, inits, inputs=(tokens,)), tmp_path)
    assert ops.count("FULLY_CONNECTED") == 2 and ops.count("BATCH_MATMUL") == 2 and "TRANSPOSE" not in ops


ELEMENTWISE = ["Add", "Sub", "Mul", "Div", "Max", "Min"]


@pytest.mark.parametrize("op", ELEMENTWISE)
def test_binary_with_channel_constant_and_activation(op, tmp_path):
    conv, inits = _conv_in()
    nodes = [*conv, helper.make_node(op, ["c", "k"], ["d"]), helper.make_node(op, ["d", "x"], ["y"])]
    inits["k"] = np.abs(_arr(4, 1, 1)) + 0.5
    ops = lower_and_compare(_model(nodes, inits), tmp_path)
    assert "TRANSPOSE" not in ops


@pytest.mark.parametrize("op,attrs", [("Sigmoid", {}), ("Tanh", {}), ("Relu", {}), ("Sin", {}), ("Cos", {}),
                                      ("Exp", {}), ("Neg", {}), ("Abs", {}), ("Gelu", {}),
                                      ("Gelu", {"approximate": "tanh"}), ("Softmax", {"axis": 1}),
                                      ("Softmax", {"axis": -1})])
def test_unary(op, attrs, tmp_path):
    conv, inits = _conv_in()
    ops = lower_and_compare(_model([*conv, helper.make_node(op, ["c"], ["y"], **attrs)], inits), tmp_path)
    assert op != "Softmax" or attrs["axis"] == 1 or "TRANSPOSE" in ops  # softmax runs on the last stored axis


def test_sqrt_pow_reciprocal_cast(tmp_path):
    nodes = [helper.make_node("Abs", ["x"], ["a"]), helper.make_node("Sqrt", ["a"], ["s"]),
             helper.make_node("Pow", ["s", "two"], ["p"]), helper.make_node("Pow", ["p", "half"], ["q"]),
             helper.make_node("Add", ["q", "one"], ["q1"]), helper.make_node("Reciprocal", ["q1"], ["r"]),
             helper.make_node("Cast", ["r"], ["y"], to=TensorProto.FLOAT)]
    inits = {"two": np.float32(2.0), "half": np.float32(0.5), "one": np.float32(1.0)}
    lower_and_compare(_model(nodes, inits), tmp_path)


def test_norms_and_reductions(tmp_path):
    conv, inits = _conv_in()
    nodes = [*conv,
             # GroupNorm as exporters write it, on an NHWC activation: matched whole, no transposes.
             helper.make_node("Reshape", ["c", "grp"], ["g"]),
             helper.make_node("InstanceNormalization", ["g", "ones", "zeros"], ["gn"], epsilon=1e-5),
             helper.make_node("Reshape", ["gn", "back"], ["gb"]),
             helper.make_node("InstanceNormalization", ["gb", "gamma", "beta"], ["inorm"], epsilon=1e-5),
             helper.make_node("ReduceMean", ["inorm", "axes"], ["m"], keepdims=1),
             helper.make_node("Sub", ["inorm", "m"], ["y"])]
    inits.update(grp=np.array([2, 2, -1], np.int64), ones=np.ones(2, np.float32), zeros=np.zeros(2, np.float32),
                 back=np.array([2, 4, 6, 6], np.int64), gamma=_arr(4), beta=_arr(4), axes=np.array([1], np.int64))
    ops = lower_and_compare(_model(nodes, inits, opset=18), tmp_path)
    assert "TRANSPOSE" not in ops


def test_exported_group_norm_folds_its_affine(tmp_path):
    """Diffusers exports GroupNorm as Reshape -> InstanceNormalization(1, 0) -> Reshape -> Mul(gamma) ->
    Add(beta); gamma is multiplied into the per-group inverse std, beta added in the same pass chain."""
    conv, inits = _conv_in()
    nodes = [*conv,
             helper.make_node("Reshape", ["c", "grp"], ["g"]),
             helper.make_node("InstanceNormalization", ["g", "ones", "zeros"], ["gn"], epsilon=1e-5),
             helper.make_node("Reshape", ["gn", "back"], ["gb"]),
             helper.make_node("Mul", ["gb", "gamma"], ["gm"]),
             helper.make_node("Add", ["gm", "beta"], ["y"])]
    inits.update(grp=np.array([2, 2, -1], np.int64), ones=np.ones(2, np.float32), zeros=np.zeros(2, np.float32),
                 back=np.array([2, 4, 6, 6], np.int64), gamma=_arr(4, 1, 1), beta=_arr(4, 1, 1))
    ops = lower_and_compare(_model(nodes, inits, opset=18), tmp_path / "unit")
    # square, normalize, gamma into inv_std: three MULs (one of them on [N, 1, G, C/G]); one ADD for eps,
    # one for beta; no transposes.
    assert ops.count("MUL") == 3 and ops.count("ADD") == 2 and "TRANSPOSE" not in ops
    # The lowerer matches nothing itself: without FuseGroupNorm's annotation the same nodes lower one by
    # one (the grouping Reshape needs row-major storage), with the same values.
    ops = lower_and_compare(_model(nodes, inits, opset=18), tmp_path / "nodes", without=FuseGroupNorm)
    assert "TRANSPOSE" in ops


def test_layer_norm_and_group_normalization_op(tmp_path):
    conv, inits = _conv_in()
    nodes = [*conv, helper.make_node("GroupNormalization", ["c", "gs", "gb"], ["g"], num_groups=2, epsilon=1e-5),
             helper.make_node("LayerNormalization", ["g", "ls", "lb"], ["y"], axis=-1, epsilon=1e-5)]
    inits.update(gs=_arr(4), gb=_arr(4), ls=_arr(6), lb=_arr(6))
    lower_and_compare(_model(nodes, inits, opset=21), tmp_path)


def test_shape_ops(tmp_path):
    conv, inits = _conv_in()
    nodes = [*conv,
             helper.make_node("Resize", ["c", "", "scales"], ["up"], mode="nearest",
                              coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
             helper.make_node("Slice", ["up", "st", "en", "ax", "stp"], ["sl"]),
             helper.make_node("Pad", ["sl", "pads"], ["pd"]),
             helper.make_node("Split", ["pd", "split"], ["s0", "s1"], axis=1),
             helper.make_node("Concat", ["s1", "s0", "s1"], ["cat"], axis=1),
             helper.make_node("Transpose", ["cat"], ["tr"], perm=[0, 2, 3, 1]),
             helper.make_node("Gather", ["tr", "idx"], ["ga"], axis=3),
             helper.make_node("Unsqueeze", ["ga", "ax0"], ["un"]),
             helper.make_node("Squeeze", ["un", "ax0"], ["sq"]),
             helper.make_node("Expand", ["sq", "shape"], ["ex"]),
             helper.make_node("Einsum", ["ex"], ["y"], equation="nhwc->nchw")]
    inits.update(scales=np.array([1, 1, 2, 2], np.float32), st=np.array([1, 0], np.int64),
                 en=np.array([11, 100], np.int64), ax=np.array([2, 3], np.int64), stp=np.array([2, 1], np.int64),
                 pads=np.array([0, 0, 1, 0, 0, 0, 0, 2], np.int64), split=np.array([1, 3], np.int64),
                 idx=np.array([-3], np.int64), ax0=np.array([0], np.int64),
                 shape=np.array([1, 1, 1, 3], np.int64))
    ops = lower_and_compare(_model(nodes, inits), tmp_path)
    # Split as SLICEs (XNNPACK delegates SLICE, not SPLIT_V); only the stepped Slice needs STRIDED_SLICE.
    assert ops.count("SLICE") == 2 and ops.count("STRIDED_SLICE") == 1 and "SPLIT_V" not in ops


def test_embedding_gather_with_int64_indices(tmp_path):
    nodes = [helper.make_node("Gather", ["table", "labels"], ["e"], axis=0),
             helper.make_node("Mul", ["e", "x2"], ["y"])]
    model = _model(nodes, {"table": _arr(11, 8)}, inputs=(("labels", [2], TensorProto.INT64), ("x2", [2, 8])))
    feed = {"labels": np.array([3, 10], np.int64), "x2": _arr(2, 8)}
    lower_and_compare(model, tmp_path, feed)


def test_runner_chunks_a_larger_batch(tmp_path):
    model = _model([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], {"w": _arr(3, 4, 3, 3)},
                   inputs=(("x", ["N", 4, 6, 6]),))
    feed = {"x": _arr(5, 4, 6, 6)}
    lower_and_compare(model, tmp_path, feed, batch=2)  # 5 samples in chunks of 2, the last one padded


def test_float64_island_runs_in_float32_and_isnan_where(tmp_path):
    # RoPE as exporters write it for Flux: positions cast to double, scaled, cos/sin, cast back.
    nodes = [helper.make_node("Cast", ["x"], ["d"], to=TensorProto.DOUBLE),
             helper.make_node("Mul", ["d", "freq"], ["a"]), helper.make_node("Cos", ["a"], ["c"]),
             helper.make_node("Cast", ["c"], ["f"], to=TensorProto.FLOAT),
             helper.make_node("IsNaN", ["f"], ["nan"]), helper.make_node("Where", ["nan", "zero", "f"], ["y"])]
    inits = {"freq": np.array([0.5, 2.0, 1.0, 3.0, 0.25, 1.5], np.float64), "zero": np.float32(0.0)}
    lower_and_compare(_model(nodes, inits), tmp_path)
