"""ONNX Runtime CPU, int8: QDQ ONNX that onnxruntime fuses into integer kernels. Runs anywhere.

Weights are int8 symmetric per output channel; activations uint8 asymmetric per tensor (the U8S8
combination onnxruntime's x86 kernels are built for). Outputs of Conv/MatMul/Gemm are quantized
too: onnxruntime fuses DQ -> Conv -> Q into QLinearConv only when the output is quantized, and a
Q/DQ graph it cannot fuse runs slower than FP32.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import onnx_graphsurgeon as gs
import onnxruntime as ort

from qcompile.caps import WEIGHTED_OPS, TargetCaps
from qcompile.config import TargetName
from qcompile.graph_io import save_bucket_graphs
from qcompile.manifest import Manifest
from qcompile.pass_manager import PassContext, PassManager
from qcompile.passes.cleanup import NameNodes
from qcompile.passes.infer_shapes import InferShapes
from qcompile.passes.insert_qdq import InsertQDQ
from qcompile.quant import QuantDType
from qcompile.runtime import OnnxRunner
from qcompile.target import (
    BucketJob,
    CompiledBucket,
    DeviceEvidence,
    DeviceReport,
    EmitPurpose,
    EmitResult,
    NoOptions,
)

ORT_INT8_CAPS = TargetCaps(
    weight_dtype=QuantDType.INT8,
    activation_dtype=QuantDType.UINT8,
    activation_symmetric=False,
    quantize_outputs_of=WEIGHTED_OPS,
)


class OrtInt8Target:
    name = TargetName.ORT_INT8
    caps = ORT_INT8_CAPS
    runtime_name = "onnxruntime"

    def __init__(self, options: NoOptions | None = None):
        self.options = options or NoOptions()

    def runtime_version(self) -> str:
        return ort.__version__

    @property
    def static_batch(self) -> None:
        return None  # dynamic shapes: the artifact takes any batch its axes record allows

    def compile_bucket(self, graph: gs.Graph, job: BucketJob, ctx: PassContext) -> CompiledBucket:
        passes = [NameNodes(), InsertQDQ(job.plan, job.ranges, self.caps), InferShapes()]
        PassManager(passes, name=f"{self.name.value}/bucket{job.index}").run(graph, ctx)
        return CompiledBucket(job.index, graph)

    def emit(self, buckets: Sequence[CompiledBucket], out_dir: Path,
             purpose: EmitPurpose = EmitPurpose.ARTIFACT) -> EmitResult:
        """One QDQ model per bucket, all reading one weight file (weights stored once)."""
        return EmitResult(save_bucket_graphs([b.graph for b in buckets], Path(out_dir)))

    def runner(self, folder: Path, manifest: Manifest) -> OnnxRunner:
        return OnnxRunner(manifest.bucket_files(folder), bucket_edges=manifest.bucket_edges,
                          timestep_name=manifest.model.timestep_input, sample_name=manifest.model.sample_input)

    def device_checks(self, folder: Path, manifest: Manifest, evidence: DeviceEvidence) -> DeviceReport | None:
        return None  # the evaluation runs onnxruntime itself
