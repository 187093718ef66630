"""Small ONNX graphs built in the tests, and helpers to run them in onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qcompile.runtime import make_session


def save_with_external_data(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=256)
    return path


def conv_mlp_model(seed: int = 0, channels: int = 8) -> onnx.ModelProto:
    """x[N,3,8,8] -> Conv(+bias) -> Relu -> Identity -> Conv -> Reshape -> MatMul -> Add: the ops
    quantization cares about, plus a foldable weight Transpose and an Identity to clean up."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((channels, 3, 3, 3)).astype(np.float32) * 0.3
    b1 = rng.standard_normal(channels).astype(np.float32) * 0.1
    w2 = rng.standard_normal((channels, channels, 3, 3)).astype(np.float32) * 0.2
    fc_t = rng.standard_normal((10, channels * 64)).astype(np.float32) * 0.05  # transposed; folded
    fc_b = rng.standard_normal(10).astype(np.float32) * 0.1
    inits = [numpy_helper.from_array(a, n) for a, n in
             ((w1, "conv1.weight"), (b1, "conv1.bias"), (w2, "conv2.weight"), (fc_t, "fc.weight_t"),
              (fc_b, "fc.bias"), (np.array([-1, channels * 64], np.int64), "flat_shape"))]
    nodes = [
        helper.make_node("Conv", ["x", "conv1.weight", "conv1.bias"], ["c1"], "conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], "relu1"),
        helper.make_node("Identity", ["r1"], ["r1_id"], "ident"),
        helper.make_node("Conv", ["r1_id", "conv2.weight"], ["c2"], "conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Reshape", ["c2", "flat_shape"], ["flat"], "flatten"),
        helper.make_node("Transpose", ["fc.weight_t"], ["fc.weight"], "fc_w_transpose", perm=[1, 0]),
        helper.make_node("MatMul", ["flat", "fc.weight"], ["mm"], "fc"),
        helper.make_node("Add", ["mm", "fc.bias"], ["y"], "fc_bias"),
    ]
    graph = helper.make_graph(
        nodes, "conv_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)


def run(path: Path, feed: dict[str, np.ndarray]) -> np.ndarray:
    return make_session(path).run(None, feed)[0]


def canonical_export(name, tmp_path_factory, exporters=("dynamo",)):
    """A tiny builtin exported and canonicalized once per test session (cached in pytest's temp root), its
    dynamic axes but the batch pinned to the adapter's defaults (as the build pins them for static targets)."""
    from qcompile.export import export_onnx
    from qcompile.graph_io import load_graph, save_graph
    from qcompile.models.source import resolve_model
    from qcompile.pass_manager import PassContext, PassManager
    from qcompile.passes.canonicalize import canonicalize_passes
    from qcompile.static_inputs import PinnedShapes, pin_graph

    suffix = "" if exporters == ("dynamo",) else "-" + "-".join(exporters)
    folder = tmp_path_factory.getbasetemp() / f"export-{name}{suffix}"
    path = folder / "canon.onnx"
    if not path.is_file():
        adapter = resolve_model(f"builtin:{name}")
        result = export_onnx(adapter, folder / "model.onnx", exporters=exporters)
        graph = load_graph(result.onnx_path)
        defaults = {n: tuple(None if a.name == "batch" else a.default for a in axes)
                    for n, axes in adapter.input_axes().items()}
        pin_graph(graph, PinnedShapes(defaults, {}))
        PassManager(canonicalize_passes(), fixed_point=True).run(graph, PassContext())
        save_graph(graph, path)
    return path


def groupnorm_skip_model(seed: int = 0, batch: int = 2, deep: int = 32, skip: int = 32, groups: int = 32,
                         size: int = 8) -> onnx.ModelProto:
    """An up-block's skip Concat into the exporters' GroupNorm (Reshape -> InstanceNormalization ->
    Reshape -> Mul(gamma) -> Add(beta)) -> SiLU -> Conv: the pattern the QNN HTP backend mishandles
    when the affine is an elementwise Mul. Trained-looking affine (gamma around 1, beta around 0)."""
    rng = np.random.default_rng(seed)
    c = deep + skip
    gamma = (1.0 + 0.3 * rng.standard_normal((c, 1, 1))).astype(np.float32)
    beta = (0.2 * rng.standard_normal((c, 1, 1))).astype(np.float32)
    w = (rng.standard_normal((16, c, 3, 3)) * 0.1).astype(np.float32)
    b = (rng.standard_normal(16) * 0.1).astype(np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in (
        (np.array([0, groups, -1], np.int64), "group_shape"), (np.ones(groups, np.float32), "ones"),
        (np.zeros(groups, np.float32), "zeros"), (np.array([batch, c, size, size], np.int64), "full_shape"),
        (gamma, "norm.weight"), (beta, "norm.bias"), (w, "conv.weight"), (b, "conv.bias"))]
    nodes = [
        helper.make_node("Concat", ["deep", "skip"], ["cat"], "cat", axis=1),
        helper.make_node("Reshape", ["cat", "group_shape"], ["grouped"], "reshape_in"),
        helper.make_node("InstanceNormalization", ["grouped", "ones", "zeros"], ["normed"], "instance_norm",
                         epsilon=1e-5),
        helper.make_node("Reshape", ["normed", "full_shape"], ["restored"], "reshape_out"),
        helper.make_node("Mul", ["restored", "norm.weight"], ["scaled"], "gamma"),
        helper.make_node("Add", ["scaled", "norm.bias"], ["gn"], "beta"),
        helper.make_node("Sigmoid", ["gn"], ["sig"], "sigmoid"),
        helper.make_node("Mul", ["gn", "sig"], ["silu"], "silu"),
        helper.make_node("Conv", ["silu", "conv.weight", "conv.bias"], ["y"], "conv", pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes, "groupnorm_skip",
        [helper.make_tensor_value_info("deep", TensorProto.FLOAT, [batch, deep, size, size]),
         helper.make_tensor_value_info("skip", TensorProto.FLOAT, [batch, skip, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 16, size, size])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)


def observed_ranges(path: Path, feeds: list[dict[str, np.ndarray]]):
    """min/max of every float tensor over `feeds`, as calibration would give with the max estimator."""
    from qcompile.calibration.stats import expose_tensors, quantizable_tensors
    from qcompile.graph_io import load_graph
    from qcompile.pass_manager import PassContext
    from qcompile.passes.infer_shapes import InferShapes
    from qcompile.quant import TensorRange

    graph = load_graph(path)
    InferShapes().run(graph, PassContext())
    names = quantizable_tensors(graph)
    session = make_session(expose_tensors(path, names))
    lo = {n: np.inf for n in names}
    hi = {n: -np.inf for n in names}
    for feed in feeds:
        for n, v in zip(names, session.run(names, feed), strict=True):
            lo[n], hi[n] = min(lo[n], float(v.min())), max(hi[n], float(v.max()))
    return {n: TensorRange(lo[n], hi[n]) for n in names}


def geglu_model(seed: int = 0, batch: int = 2, tokens: int = 64, dim: int = 64, hidden: int = 256) -> onnx.ModelProto:
    """A transformer feed-forward as exporters write it: LayerNorm -> MatMul -> Add(bias) -> Split ->
    Gelu(gate) * value (diffusers' GEGLU)."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(a, n) for a, n in (
        ((rng.standard_normal((dim, 2 * hidden)) * 0.1).astype(np.float32), "proj.weight"),
        ((rng.standard_normal(2 * hidden) * 0.1).astype(np.float32), "proj.bias"),
        (np.ones(dim, np.float32), "norm.weight"), (np.zeros(dim, np.float32), "norm.bias"))]
    nodes = [
        helper.make_node("LayerNormalization", ["x", "norm.weight", "norm.bias"], ["normed"], "norm", axis=-1),
        helper.make_node("MatMul", ["normed", "proj.weight"], ["projected"], "proj"),
        helper.make_node("Add", ["projected", "proj.bias"], ["biased"], "proj_bias"),
        helper.make_node("Split", ["biased"], ["value", "gate"], "split", axis=2, num_outputs=2),
        helper.make_node("Gelu", ["gate"], ["gelu"], "gelu"),
        helper.make_node("Mul", ["value", "gelu"], ["y"], "geglu"),
    ]
    graph = helper.make_graph(nodes, "geglu",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, tokens, dim])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, tokens, hidden])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)


def compile_bucket(target, graph, plan, ranges, index: int = 0):
    """One bucket through a target's own passes (what the build does per timestep bucket)."""
    from qcompile.pass_manager import PassContext
    from qcompile.target import BucketJob

    return target.compile_bucket(graph, BucketJob(index, plan, ranges, None), PassContext())


def manifest_for(bucket_files, timestep_ranges, *, timestep_input=None, sample_input=None, device=None):
    """The least manifest a target's runner reads: buckets with their files and ranges, the model's roles."""
    from qcompile.manifest import BucketRecord, ExportRecord, Manifest, ModelRecord, SourceRecord

    buckets = tuple(BucketRecord(k, tuple(r), (), tuple(f))
                    for k, (f, r) in enumerate(zip(bucket_files, timestep_ranges, strict=True)))
    return Manifest(target="test", precision="test", qcompile_version="test",
                    source=SourceRecord("test", None, 0, "test", "test", "fp32/model.onnx"),
                    model=ModelRecord((), ("y",), sample_input, timestep_input, 1000.0),
                    export=ExportRecord("test", 20, 0.0), buckets=buckets, device=device or {})
