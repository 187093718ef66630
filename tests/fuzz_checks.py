"""What the property tests check on one generated graph, as plain functions: the hypothesis tests
(tests/test_fuzz_*.py) call them on drawn specs, the regression tests (tests/test_fuzz_found.py) on
the minimal specs the fuzzer found.

Each check runs the product path: the passes as the build runs them, calibration through the real
recorder / statistics / MAX estimator on random inputs, the target's own pipeline and emitter, and
the real runtime on the other side (onnxruntime unoptimized, the LiteRT interpreter, the QNN HTP
simulator). Profiles: `QCOMPILE_FUZZ_PROFILE=ci` (the default) or `nightly` (see `fuzz_settings`).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from fuzz_graphs import GraphSpec, build_model
from hypothesis import HealthCheck, Phase, settings

from qcompile.calibration.estimators import estimate_ranges
from qcompile.calibration.inputs import InputSet
from qcompile.calibration.recorder import record_input_set
from qcompile.calibration.stats import collect_stats
from qcompile.config import Estimator
from qcompile.graph_io import load_graph, raise_opset, save_graph
from qcompile.pass_manager import Pass, PassContext, PassManager
from qcompile.passes.canonicalize import canonicalize_passes
from qcompile.passes.cleanup import NameNodes
from qcompile.passes.infer_shapes import InferShapes
from qcompile.passes.insert_qdq import plan_quantization
from qcompile.runtime import make_session
from qcompile.target import BucketJob

PROFILE = os.environ.get("QCOMPILE_FUZZ_PROFILE", "ci")
if PROFILE not in ("ci", "nightly"):
    raise ValueError(f"QCOMPILE_FUZZ_PROFILE must be 'ci' or 'nightly', not {PROFILE!r}")


def fuzz_settings(*, ci: int, nightly: int) -> settings:
    """A fixed seed (derandomize: the same graphs on every run and machine), no example database,
    no deadline (the HTP simulator compiles for a second or two), `ci` or `nightly` examples."""
    return settings(max_examples=ci if PROFILE == "ci" else nightly, derandomize=True, database=None,
                    deadline=None, print_blob=True, phases=[Phase.explicit, Phase.generate, Phase.shrink],
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


# --- runtimes ---------------------------------------------------------------------------------------
def run_onnx(path: Path, feeds: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    """First output per feed, onnxruntime with graph optimizations off: the ops as written, so a
    rewrite is compared with the graph it rewrote, not with onnxruntime's own fusions of either."""
    session = make_session(path, optimize=False)
    names = {i.name for i in session.get_inputs()}
    return [session.run(None, {k: v for k, v in feed.items() if k in names})[0] for feed in feeds]


def save_spec(spec: GraphSpec, folder: Path) -> Path:
    path = folder / "float.onnx"
    onnx.save(build_model(spec), str(path))
    return path


def canonical(spec: GraphSpec, folder: Path) -> Path:
    """The graph as every build starts from it: canonicalized to a fixed point."""
    graph = load_graph(save_spec(spec, folder))
    PassManager(canonicalize_passes(), fixed_point=True).run(graph, PassContext())
    return save_graph(graph, folder / "canonical.onnx")


def calibrated_ranges(spec: GraphSpec, path: Path, names, folder: Path, *, levels: int = 255, also=()):
    """Ranges of `names` from a real calibration: 8 random batches (and the feeds `also`) recorded,
    statistics collected in onnxruntime, the MAX estimator (what a build with `--estimator max` does)."""
    feeds = [*spec.inputs(8, seed=1), *also]
    arrays = {k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]}
    recording = record_input_set(InputSet(arrays, None), folder / "recording", {})
    table = collect_stats(path, load_graph(path), recording, names=list(names), batch=spec.shape[0])
    return estimate_ranges(table, Estimator.MAX, names=list(names), levels=levels, symmetric=False)


# --- property 1: passes preserve float numerics -------------------------------------------------
# onnxruntime float32 kernels: a fused or reordered computation (LayerNormalization for its decomposed
# form, Gemm for MatMul + Add, a depthwise Conv for Mul + Add) rounds differently, a few float32 ulps
# of its operands per op. rtol is taken relative to the output tensor's largest magnitude, not to each
# element: where later ops cancel (a residual Add, x - mean), an element much smaller than its operands
# carries their absolute error (found: a fused LayerNorm then x + Linear(x) landing at -0.021 differed
# by 3.5e-6, 1.6e-4 of that element and 3e-6 of the tensor's largest value).
FLOAT_RTOL, FLOAT_ATOL = 1e-5, 1e-6


def assert_float_close(got: np.ndarray, want: np.ndarray, what: str) -> float:
    """max |got - want| <= atol + rtol * max |want|; returns the largest difference."""
    assert got.shape == want.shape, f"{what}: output shape {got.shape} != {want.shape}"
    diff = float(np.abs(got.astype(np.float64) - want).max(initial=0.0))
    bound = FLOAT_ATOL + FLOAT_RTOL * float(np.abs(want).max(initial=0.0))
    assert np.isfinite(got).all() == np.isfinite(want).all() and diff <= bound, \
        f"{what}: max |diff| {diff:.3g} > {bound:.3g} (output max |y| {np.abs(want).max():.3g})"
    return diff


@dataclass(frozen=True)
class PassOutcome:
    name: str
    modified: bool
    max_abs_diff: float


def apply_pass(source: Path, passes: list[Pass], out: Path, *, opset: int | None = None, fixed_point: bool = False,
               setup: tuple[Pass, ...] = ()) -> tuple[Path, bool]:
    """`passes` on a fresh copy of `source`, after shape inference, node naming and `setup` (what the
    build's pipelines run before them); returns the saved result and whether `passes` modified it."""
    graph = load_graph(source)
    if opset is not None:
        raise_opset(graph, opset)
    ctx = PassContext()
    PassManager([InferShapes(), NameNodes(), *setup]).run(graph, ctx)
    modified = PassManager(passes, fixed_point=fixed_point).run(graph, ctx).modified
    return save_graph(graph, out), modified


@dataclass(frozen=True)
class PassCase:
    """Passes checked together on one graph: `setup` first (not counted as a rewrite), at `opset`."""

    name: str
    passes: list[Pass]
    setup: tuple[Pass, ...] = ()
    opset: int | None = None
    fixed_point: bool = False


def check_pass(case: PassCase, source: Path, feeds, reference, folder: Path) -> PassOutcome:
    path, modified = apply_pass(source, case.passes, folder / f"{case.name}.onnx", opset=case.opset,
                                fixed_point=case.fixed_point, setup=case.setup)
    if not modified:
        return PassOutcome(case.name, False, 0.0)
    diffs = [assert_float_close(got, want, f"after pass {case.name}")
             for want, got in zip(reference, run_onnx(path, feeds), strict=True)]
    return PassOutcome(case.name, True, max(diffs))


def raw_passes() -> list[PassCase]:
    """Run on the graph as generated: canonicalize's passes one by one and together (to a fixed point)."""
    from qcompile.passes.cleanup import EliminateDeadNodes, RemoveIdentity
    from qcompile.passes.fold_constants import FoldConstants

    return [PassCase("fold-constants", [FoldConstants()]), PassCase("remove-identity", [RemoveIdentity()]),
            PassCase("eliminate-dead-nodes", [EliminateDeadNodes()]),
            PassCase("canonicalize", canonicalize_passes(), fixed_point=True)]


def canonical_passes(batch: int) -> list[PassCase]:
    """Run on the canonical graph: each rewrite a target or the build uses, alone, and the QNN
    target's rewrite chain in its order. The generated graphs have a symbolic batch, as exported ones;
    rewrites that need static shapes (LinearAsGemm, the unpatchify one) run after StaticShapes, as in
    the QNN pipeline."""
    from qcompile.passes.einsum_as_transpose import EinsumAsTranspose
    from qcompile.passes.fuse_attention import FuseAttention
    from qcompile.passes.fuse_gelu import FuseGelu
    from qcompile.passes.fuse_groupnorm import FuseGroupNorm, GroupNormForm
    from qcompile.passes.fuse_layernorm import FuseLayerNorm
    from qcompile.passes.fuse_rmsnorm import FuseRMSNorm
    from qcompile.passes.groupnorm_affine_conv import GroupNormAffineAsConv
    from qcompile.passes.linear_as_gemm import LinearAsGemm
    from qcompile.passes.remove_nan_guards import RemoveNanGuards
    from qcompile.passes.split_shortcut_concat import SplitShortcutConcat
    from qcompile.passes.static_shapes import StaticShapes
    from qcompile.passes.unpatchify_depth_to_space import UnpatchifyAsDepthToSpace

    static = (StaticShapes(batch),)
    qnn_chain = [RemoveNanGuards(), EinsumAsTranspose(), InferShapes(), UnpatchifyAsDepthToSpace(), FuseRMSNorm(),
                 LinearAsGemm(), GroupNormAffineAsConv(), InferShapes()]
    return [
        PassCase("static-shapes", [StaticShapes(batch)]),
        PassCase("fuse-layernorm", [FuseLayerNorm()]), PassCase("fuse-gelu", [FuseGelu()]),
        PassCase("fuse-rmsnorm", [FuseRMSNorm()]), PassCase("fuse-attention", [FuseAttention()]),
        PassCase("fuse-groupnorm-annotated", [FuseGroupNorm(GroupNormForm.ANNOTATED)]),
        PassCase("split-shortcut-concat", [SplitShortcutConcat()]),
        PassCase("groupnorm-affine-as-conv", [GroupNormAffineAsConv()]),
        PassCase("linear-as-gemm", [LinearAsGemm()], static),
        PassCase("einsum-as-transpose", [EinsumAsTranspose()]),
        PassCase("unpatchify-as-depth-to-space", [UnpatchifyAsDepthToSpace()], static),
        PassCase("remove-nan-guards", [RemoveNanGuards()]),
        PassCase("qnn-rewrites", qnn_chain, static),
    ]


def check_float_passes(spec: GraphSpec) -> list[PassOutcome]:
    with tempfile.TemporaryDirectory(prefix="qcompile-fuzz-") as tmp:
        folder = Path(tmp)
        raw = save_spec(spec, folder)
        feeds = spec.inputs(2, seed=0)
        reference = run_onnx(raw, feeds)
        outcomes = [check_pass(case, raw, feeds, reference, folder) for case in raw_passes()]
        canon = folder / "canonicalize.onnx"  # saved whether or not it changed anything
        outcomes += [check_pass(case, canon, feeds, reference, folder) for case in canonical_passes(spec.shape[0])]
        return outcomes


# --- property 2: the TFLite emitter agrees with onnxruntime on the same Q/DQ graph ---------------
TFLITE_KEY = "serving_default"


@dataclass(frozen=True)
class TfliteOutcome:
    int8_tensors: int
    local_max_lsb: int  # worst int8 tensor, computed from the interpreter's own upstream int8 tensors
    end_to_end_max_lsb: int  # worst int8 tensor, both runtimes from the same float inputs
    output_scale: float  # one step of the output's range at 8 bits
    output_local_lsb: float  # the float output from the interpreter's upstream int8 tensors, in output steps
    output_end_to_end_lsb: float


def tflite_qdq_graph(spec: GraphSpec, caps, folder: Path) -> Path:
    """The tflite-int8 target's Q/DQ graph for `spec`: canonicalized, planned with `caps`, calibrated,
    through the target's pipeline (NameNodes, InsertQDQ, StaticShapes)."""
    from qcompile.targets.tflite.options import TfliteOptions
    from qcompile.targets.tflite.target import TfliteInt8Target

    canon = canonical(spec, folder)
    plan = plan_quantization(load_graph(canon), caps)
    ranges = calibrated_ranges(spec, canon, plan.activations, folder)
    target = TfliteInt8Target(TfliteOptions(batch=spec.shape[0]))
    target.caps = caps
    compiled = target.compile_bucket(load_graph(canon), BucketJob(0, plan, ranges, None), PassContext())
    return save_graph(compiled.graph, folder / "qdq.onnx")


def check_tflite(spec: GraphSpec, caps) -> TfliteOutcome:
    """The Q/DQ graph lowered by `write_model`, run in the LiteRT interpreter, against onnxruntime
    running that Q/DQ graph unoptimized, on held-out random inputs."""
    from qcompile.targets.tflite.convert import write_model
    from qcompile.targets.tflite.validate import quantized_tensor_agreement, run_onnx_static

    batch = spec.shape[0]
    with tempfile.TemporaryDirectory(prefix="qcompile-fuzz-") as tmp:
        folder = Path(tmp)
        qdq = tflite_qdq_graph(spec, caps, folder)
        quantized: dict[str, list] = {}
        tflite = write_model([(TFLITE_KEY, load_graph(qdq))], folder / "model.tflite", batch=batch,
                             quantized=quantized)
        feeds = spec.inputs(3, seed=2)
        feed = {k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]}
        tensors = quantized_tensor_agreement(tflite, TFLITE_KEY, qdq, quantized[TFLITE_KEY], feed, batch=batch)
        want = run_onnx_static(qdq, feed, batch)
        got, local = _tflite_output_local(tflite, qdq, quantized[TFLITE_KEY], feed, batch)
        # One step of the output's 8-bit range; never finer than float32 agreement (a constant output).
        scale = max(float(want.max() - want.min()) / 255.0, FLOAT_ATOL + FLOAT_RTOL * float(np.abs(want).max()))
        return TfliteOutcome(
            len(tensors), max((t.local_max_lsb for t in tensors), default=0),
            max((t.max_lsb for t in tensors), default=0), scale,
            float(np.abs(got.astype(np.float64) - local).max(initial=0.0)) / scale,
            float(np.abs(got.astype(np.float64) - want).max(initial=0.0)) / scale)


def _tflite_output_local(tflite: Path, qdq: Path, quantized: list, feed: dict[str, np.ndarray], batch: int):
    """(interpreter output, onnxruntime output computed from the interpreter's int8 tensors) over
    `feed` in static-batch chunks: the output's own check, as `quantized_tensor_agreement`'s local
    one is for each int8 tensor (only the ops after the last int8 tensors are compared)."""
    from qcompile.runtime import static_chunks
    from qcompile.targets.tflite.layout import invert
    from qcompile.targets.tflite.runner import read_metadata
    from qcompile.targets.tflite.validate import INJECTED, _Interpreted, _probe_session

    names = [q[0] for q in quantized]
    interpreter = _Interpreted(tflite, TFLITE_KEY, quantized)
    [out_spec] = read_metadata(tflite.read_bytes())["signatures"][TFLITE_KEY]["outputs"]
    output_index = interpreter.runner.get_output_details()[out_spec["name"]]["index"]
    local = _probe_session(qdq, names, injected=True)
    got, want = [], []
    for chunk, count in static_chunks(feed, batch, set(feed)):
        test = interpreter.run(chunk)
        out = interpreter.interpreter.get_tensor(output_index)
        got.append(np.transpose(out, invert(tuple(out_spec["perm"])))[:count])
        onnx_feed = {i.name: chunk[i.name] for i in local.get_inputs() if not i.name.endswith(INJECTED)}
        want.append(local.run(None, {**onnx_feed, **{n + INJECTED: test[n] for n in names}})[0][:count])
    return np.concatenate(got), np.concatenate(want)


# --- property 3: the QNN Q/DQ graph on the HTP simulator against onnxruntime's CPU EP -------------
# Largest local difference between HTP and the CPU EP, in steps of the tensor's own scale, by the
# tensor's width. Measured over the nightly profile (200 graphs, the held-out inputs calibrated):
# 8-bit tensors differ by 1 step (requantization rounding), norms and Softmax by 2; 16-bit tensors
# (W8A16, and the outputs of W8A8 graphs) by a median 17 and at most 210 steps (HTP's activation x
# activation MatMul and Softmax at 16 bits), i.e. under one step of the same range at 8 bits.
QNN_LOCAL_LSB = {8: 3.0, 16: 256.0}


@dataclass(frozen=True)
class QnnOutcome:
    bits: int  # activation width
    local_max_lsb: dict  # {tensor width: worst local difference in that tensor's steps}
    local_worst: dict  # {tensor width: 'op tensor' where}
    output_max_lsb: float  # the graph output end to end, in steps of its scale
    sqnr_db: float  # the graph output end to end, HTP against the CPU EP
    deterministic: bool
    # Tensors zero throughout calibration: their scale is MIN_SCALE (1e-8), and a Conv/Gemm reading one
    # needs an int32 bias at 1e-8 * s_w, which saturates (test_fuzz_found.py); the property skips them.
    zero_range: tuple[str, ...] = ()

    def within(self, tolerance: dict) -> bool:
        return all(lsb <= tolerance[bits] for bits, lsb in self.local_max_lsb.items())


def qnn_qdq_graph(spec: GraphSpec, caps, folder: Path, *, also=()) -> tuple[Path, list[str]]:
    """The QNN target's Q/DQ graph for `spec`: canonicalized, every float tensor calibrated (on random
    inputs and the feeds `also`), through the target's own pipeline (static shapes, HTP rewrites,
    integer-only Q/DQ, 16-bit outputs); and the tensors that were zero throughout calibration."""
    from qcompile.targets.qnn.options import QnnOptions
    from qcompile.targets.qnn.target import QnnW8A8Target, QnnW8A16Target

    options = QnnOptions(batch=spec.shape[0])
    target = QnnW8A8Target(options) if caps.activation_dtype.bits == 8 else QnnW8A16Target(options)
    canon = canonical(spec, folder)
    plan = plan_quantization(load_graph(canon), target.caps)
    levels = caps.activation_dtype.qmax - caps.activation_dtype.qmin
    ranges = calibrated_ranges(spec, canon, plan.activations, folder, levels=levels, also=also)
    compiled = target.compile_bucket(load_graph(canon), BucketJob(0, plan, ranges, None), PassContext())
    zero = [n for n, r in ranges.items() if r.lo == 0.0 == r.hi]
    return save_graph(compiled.graph, folder / "qdq.onnx"), zero


def check_qnn(spec: GraphSpec, caps) -> QnnOutcome:
    """HTP (CPU fallback disabled: a refused node fails the session) against the CPU EP on the same
    Q/DQ graph, on held-out random inputs: every activation locally (the CPU EP computing each op from
    HTP's own upstream values, so HTP's rounding is not compounded through later layers), the output end
    to end; HTP runs twice to check it is deterministic."""
    from qcompile.evaluation.metrics import sqnr_db
    from qcompile.targets.qnn import ep
    from qcompile.targets.tflite.validate import output_scale

    with tempfile.TemporaryDirectory(prefix="qcompile-fuzz-") as tmp:
        folder = Path(tmp)
        # The held-out inputs are in the calibration: no tensor leaves its calibrated range. Outside it
        # HTP saturates less often than the Q/DQ graph says (a graph input read by a Concat, a Concat of
        # a Concat: test_fuzz_found.py pins both), which is about ranges, not about what each op computes.
        feeds = spec.inputs(2, seed=2)
        qdq, zero = qnn_qdq_graph(spec, caps, folder, also=feeds)
        want = np.concatenate(run_onnx(qdq, feeds))
        session = ep.htp_session(qdq, quiet=True)
        names = [i.name for i in session.get_inputs()]
        runs = [np.concatenate([session.run(None, {n: f[n] for n in names})[0] for f in feeds]) for _ in range(2)]
        scale = output_scale(load_graph(qdq))
        assert scale is not None, "the QNN graph output is not dequantized"
        diff = float(np.abs(runs[0].astype(np.float64) - want).max(initial=0.0))
        local, worst = qnn_local_agreement(qdq, feeds, folder)
        return QnnOutcome(caps.activation_dtype.bits, local, worst, diff / scale,
                          round(float(sqnr_db(want, runs[0])), 2), bool(np.array_equal(runs[0], runs[1])),
                          tuple(zero))


def qnn_local_agreement(qdq: Path, feeds, folder: Path) -> tuple[dict, dict]:
    """({width: largest difference}, {width: 'op tensor' where}) in steps of each activation's own
    scale, by its width, between HTP's value of every quantized activation and the CPU EP's value
    computed from HTP's upstream activations.

    Every activation's DequantizeLinear output is exposed (`validate.exposed_activations`) and HTP runs
    that graph; then the CPU EP runs it with each reader of an exposed tensor reading an extra input
    holding HTP's value instead, so each op sees the integers HTP fed it (what `TfliteInt8Target`'s
    local check does for TFLite)."""
    from qcompile.targets.qnn import ep
    from qcompile.targets.qnn.validate import exposed_activations

    exposed, listed = exposed_activations(qdq, folder / "exposed.onnx")
    names = [e.output for e in listed]
    # A graph input's own pair is left out: exposed, HTP reports the float input there (its readers get
    # the quantized values: the next tensors agree), and no HTP op computes it.
    listed = [e for e in listed if e.op != "input"]
    dequantizers = {n.outputs[0].name: n for n in load_graph(exposed).nodes if n.op == "DequantizeLinear"}
    # (width, step) each activation is compared in: its own; for a Convert (an 8-bit tensor requantized
    # to 16 bits exactly, before a 16-bit op) the 8-bit one it carries, so 8-bit rounding upstream is one step.
    grid = {}
    for e in listed:
        source = dequantizers.get(e.tensor) or dequantizers[e.output]
        grid[e.output] = (np.iinfo(source.inputs[2].values.dtype).bits, float(np.max(source.inputs[1].values)))
    model = onnx.load(str(exposed))
    wanted = {e.output for e in listed}
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in wanted:
                node.input[i] = name + "/injected"
    model.graph.input.extend(onnx.helper.make_tensor_value_info(n + "/injected", onnx.TensorProto.FLOAT, None)
                             for n in wanted)
    injected = folder / "injected.onnx"
    onnx.save(model, str(injected))
    htp = ep.htp_session(exposed, quiet=True)
    cpu = make_session(injected, optimize=False)
    inputs = [i.name for i in htp.get_inputs()]
    worst: dict[int, float] = {}
    where: dict[int, str] = {}
    for feed in feeds:
        got = dict(zip(names, htp.run(names, {n: feed[n] for n in inputs}), strict=True))
        local = dict(zip(names, cpu.run(names, {**{n: feed[n] for n in inputs},
                                                **{n + "/injected": got[n] for n in wanted}}), strict=True))
        for e in listed:
            bits, step = grid[e.output]
            lsb = float(np.abs(local[e.output].astype(np.float64) - got[e.output]).max(initial=0.0)) / step
            if lsb >= worst.get(bits, 0.0):
                worst[bits], where[bits] = lsb, f"{e.op} {e.tensor}"
    return worst, where
