"""TensorRT, INT8 and FP8: Q/DQ ONNX placed by TensorRT's explicit-quantization rules, linted on every
build, its numerics emulated in onnxruntime CPU, and an engine where TensorRT and a GPU exist.

`trt-int8`: int8 symmetric per-channel weights, int8 symmetric per-tensor activations.
`trt-fp8`: the same in float8 E4M3 (FLOAT8E4M3FN, opset >= 19), plus FP8 attention (Q/DQ on Q, K, V
and the softmax output) for heads that are a multiple of 16 wide.
Which layers: `--trt-level` (conv, ffn, qkv, linear, attention), whole layers only
(`passes/plan_explicit.py`). Numerics: the evaluation runs the Q/DQ graph in onnxruntime CPU, which
implements int8 and float8 QuantizeLinear/DequantizeLinear exactly as ONNX defines them; for FP8 with
its graph optimizations off (its fused CPU kernels have no float8 types). That emulates TensorRT's
quantization points, not its kernels (TensorRT accumulates in its own order and may fuse differently):
the report says so. The engine: `engine.py` (Polygraphy, behind `unavailable()`); built in
`device_checks`, which has the manifest's axes record for the optimization profile.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import onnx_graphsurgeon as gs
import onnxruntime as ort
from onnx_graphsurgeon.logger.logger import G_LOGGER, LoggerSuppress

from qcompile.atomic import write_json
from qcompile.caps import ExplicitRules, QuantLevel, TargetCaps
from qcompile.config import TargetName
from qcompile.errors import UserError
from qcompile.graph_io import raise_opset, save_bucket_graphs, save_graph
from qcompile.manifest import Manifest
from qcompile.pass_manager import PassContext, PassManager
from qcompile.passes.cleanup import NameNodes
from qcompile.passes.fuse_attention import FuseAttention
from qcompile.passes.fuse_gelu import FuseGelu
from qcompile.passes.fuse_layernorm import FuseLayerNorm
from qcompile.passes.infer_shapes import InferShapes
from qcompile.passes.insert_qdq import InsertQDQ
from qcompile.passes.plan_explicit import LAYER_OPS
from qcompile.quant import QuantDType
from qcompile.runtime import OnnxRunner
from qcompile.target import (
    BucketJob,
    CompiledBucket,
    DeviceEvidence,
    DeviceReport,
    EmitPurpose,
    EmitResult,
)
from qcompile.targets.tensorrt import engine
from qcompile.targets.tensorrt.buckets import BUCKET_INPUT, one_engine_graph
from qcompile.targets.tensorrt.lint import LintRules, Rule, check
from qcompile.targets.tensorrt.options import TRT_LEVEL, RescaleAt, TrtOptions

FP8_OPSET = 19
ENGINE_DIR = "trt"
BUCKETS_ONNX = f"{ENGINE_DIR}/model_buckets.onnx"
BUILD_JSON = f"{ENGINE_DIR}/engine_build.json"
ENGINE_FILE = f"{ENGINE_DIR}/model.engine"


def quiet_graphsurgeon() -> LoggerSuppress:
    return LoggerSuppress(G_LOGGER, G_LOGGER.ERROR)


def trt_caps(dtype: QuantDType, level: QuantLevel, residual_adds: bool = True) -> TargetCaps:
    return TargetCaps(weight_dtype=dtype, activation_dtype=dtype, activation_symmetric=True, weighted_ops=LAYER_OPS,
                      quantize_bias=False, explicit=ExplicitRules(level, residual_adds=residual_adds))


class TrtTarget:
    """Shared by trt-int8 and trt-fp8; the subclasses set the name, the dtype and the default level."""

    name: TargetName
    dtype: QuantDType
    default_level: QuantLevel
    runtime_name = "onnxruntime CPU (TensorRT numerics emulated)"

    def __init__(self, options: TrtOptions | None = None):
        self.options = options or TrtOptions()
        level = self.options.level or self.default_level
        if level is QuantLevel.ATTENTION and not self.dtype.is_float:
            raise UserError(f"{TRT_LEVEL.flag} attention: {self.name.value} has no quantized attention (TensorRT fuses "
                            "FP8 attention; choose trt-fp8, or a lower level)")
        self.level = level
        self.caps = trt_caps(self.dtype, level, self.options.residual_adds)

    def runtime_version(self) -> str:
        return ort.__version__

    @property
    def static_batch(self) -> None:
        return None  # dynamic shapes: the artifact takes any batch its axes record allows

    def lint_rules(self, float_layers: Sequence[str] = (), rescale_before_layers: bool = False) -> LintRules:
        rules = self.caps.explicit
        return LintRules(float_layers=frozenset(float_layers), min_width=rules.min_width,
                         head_multiple=rules.head_multiple, residual_adds=rules.residual_adds,
                         rescale_before_layers=rescale_before_layers)

    def compile_bucket(self, graph: gs.Graph, job: BucketJob, ctx: PassContext) -> CompiledBucket:
        if self.dtype.is_float and (graph.opset or 0) < FP8_OPSET:
            raise_opset(graph, FP8_OPSET)  # float8 QuantizeLinear/DequantizeLinear arrive in opset 19
        # Decomposed LayerNorm / GELU (legacy exports) as the single ops TensorRT has kernels for; each keeps
        # its output tensor, which is what the plan quantizes (dynamo exports have them already). FuseAttention
        # marks each attention unit in the emitted graph's node metadata: which nodes TensorRT's MHA fusion
        # is expected to take (the unit's Q/DQ placement is the plan's).
        passes = [NameNodes(), InferShapes(), FuseLayerNorm(), FuseGelu(), FuseAttention(),
                  InsertQDQ(job.plan, job.ranges, self.caps), InferShapes()]
        with quiet_graphsurgeon():  # its importer warns about every float8 tensor it keeps as ONNX type
            PassManager(passes, name=f"{self.name.value}/bucket{job.index}").run(graph, ctx)
        check([(f"bucket {job.index}", graph)], self.lint_rules(job.plan.excluded))
        return CompiledBucket(job.index, graph)

    def emit(self, buckets: Sequence[CompiledBucket], out_dir: Path,
             purpose: EmitPurpose = EmitPurpose.ARTIFACT) -> EmitResult:
        """Each bucket's Q/DQ model (what onnxruntime emulates) and, for several buckets, the one-engine
        graph TensorRT builds from; the engine itself comes in `device_checks`."""
        out_dir = Path(out_dir)
        files = save_bucket_graphs([b.graph for b in buckets], out_dir)
        if purpose is EmitPurpose.PROBE:
            return EmitResult(files)
        graphs = [(f"bucket {b.index}", b.graph) for b in buckets]
        sdk: tuple[str, ...] = ()
        engine_onnx = files[0][0]
        if len(buckets) > 1:
            at = self.options.bucket_rescale
            merged = one_engine_graph([b.graph for b in buckets], at)
            graphs.append(("one-engine graph", merged))
            check([graphs[-1]], self.lint_rules(rescale_before_layers=at is RescaleAt.INPUT))
            save_graph(merged, out_dir / BUCKETS_ONNX)
            sdk = (BUCKETS_ONNX, BUCKETS_ONNX + ".data")
            engine_onnx = BUCKETS_ONNX
        nodes = sum(len(g.nodes) for _, g in graphs)
        rules = [r.value for r in Rule if r is not Rule.RESIDUAL_ADD or self.options.residual_adds]
        device = {"engine_onnx": engine_onnx, "bucket_input": BUCKET_INPUT if len(buckets) > 1 else None,
                  "bucket_rescale": self.options.bucket_rescale.value if len(buckets) > 1 else None,
                  "level": self.level.value, "residual_adds": self.options.residual_adds,
                  "max_batch": self.options.max_batch, "opt_level": self.options.opt_level,
                  "timing_cache": None if self.options.timing_cache is None else str(self.options.timing_cache),
                  "lint": {"graphs": len(graphs), "nodes": nodes, "violations": 0, "rules": rules},
                  "numerics": f"{self.dtype.value} Q/DQ emulated in onnxruntime CPU"}
        return EmitResult(files, sdk, device)

    def runner(self, folder: Path, manifest: Manifest) -> OnnxRunner:
        return OnnxRunner(manifest.bucket_files(folder), bucket_edges=manifest.bucket_edges,
                          timestep_name=manifest.model.timestep_input, sample_name=manifest.model.sample_input,
                          optimize=not self.dtype.is_float)

    def device_checks(self, folder: Path, manifest: Manifest, evidence: DeviceEvidence) -> DeviceReport | None:
        """The engine: profiles from the axes record, written as `trt/engine_build.json` everywhere; built
        only where TensorRT and a GPU exist (one line says why not)."""
        folder = Path(folder)
        dev = dict(manifest.device)
        bucket_input = dev.get("bucket_input")
        shapes = engine.profiles(manifest.model.inputs, int(dev.get("max_batch", self.options.max_batch)),
                                 extra={bucket_input: [1]} if bucket_input else {})
        plan = {"onnx": dev.get("engine_onnx"), "profiles": shapes, "strongly_typed": True,
                "builder_optimization_level": dev.get("opt_level"), "timing_cache": dev.get("timing_cache"),
                "buckets": [{"index": b.index, "timesteps": list(b.timestep_range)} for b in manifest.buckets],
                "bucket_input": bucket_input, "outputs": list(manifest.model.outputs), "target": manifest.target}
        (folder / ENGINE_DIR).mkdir(exist_ok=True)
        write_json(folder / BUILD_JSON, plan)
        reason = engine.unavailable()
        details = {"tensorrt": {**plan, "lint": dev.get("lint"), "numerics": dev.get("numerics"),
                                "engine": None if reason else ENGINE_FILE, "not_built_because": reason}}
        if reason is not None:
            print(f"[qcompile] engine not built: {reason}", flush=True)
            return DeviceReport(device=f"none: {reason}; numerics emulated in onnxruntime CPU", buckets=(),
                                summary={"trt_engine": "not built", "trt_numerics": "emulated"}, checks={},
                                details=details)
        timing = dev.get("timing_cache")
        sidecar = engine.build_engine(folder / plan["onnx"], folder / ENGINE_FILE, shapes,
                                      opt_level=int(dev.get("opt_level", 3)),
                                      timing_cache=Path(timing) if timing else None, sidecar=plan)
        details["tensorrt"]["sidecar"] = sidecar
        return DeviceReport(device=f"TensorRT {sidecar['tensorrt']} on {sidecar['gpu']}", buckets=(),
                            summary={"trt_engine": ENGINE_FILE, "trt_numerics": "emulated (engine built, not compared "
                                     "here: run tools/trt_gpu_check.py)"},
                            checks={"trt_engine_built": (folder / ENGINE_FILE).is_file()}, details=details)


class TrtInt8Target(TrtTarget):
    name = TargetName.TRT_INT8
    dtype = QuantDType.INT8
    default_level = QuantLevel.LINEAR


class TrtFp8Target(TrtTarget):
    name = TargetName.TRT_FP8
    dtype = QuantDType.FLOAT8E4M3FN
    default_level = QuantLevel.ATTENTION
