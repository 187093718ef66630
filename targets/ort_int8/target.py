"""ONNX Runtime CPU, int8: QDQ ONNX that onnxruntime fuses into integer kernels. Runs anywhere.

Weights are int8 symmetric per output channel; activations uint8 asymmetric per tensor (the U8S8
combination onnxruntime's x86 kernels are built for). Outputs of Conv/MatMul/Gemm are quantized
too: onnxruntime fuses DQ -> Conv -> Q into QLinearConv only when the output is quantized, and a
Q/DQ graph it cannot fuse runs slower than FP32.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import onnx_graphsurgeon as gs
import onnxruntime as ort

from qcompile.caps import WEIGHTED_OPS, TargetCaps
from qcompile.config import TargetName
from qcompile.graph_io import save_graph, save_graphs
from qcompile.pass_manager import Pass
from qcompile.passes.cleanup import NameNodes
from qcompile.passes.infer_shapes import InferShapes
from qcompile.passes.insert_qdq import InsertQDQ, QuantPlan
from qcompile.quant import QuantDType, TensorRange
from qcompile.runtime import OnnxRunner

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

    def runtime_version(self) -> str:
        return ort.__version__

    def pipeline(self, plan: QuantPlan, ranges: Mapping[str, TensorRange], *,
                 timestep_input: str | None = None) -> list[Pass]:
        return [NameNodes(), InsertQDQ(plan, ranges, self.caps), InferShapes()]

    def emit(self, graphs: Sequence[gs.Graph], out_dir: Path) -> list[list[str]]:
        """One QDQ model per bucket, all reading one weight file (weights stored once)."""
        if len(graphs) == 1:
            save_graph(graphs[0], out_dir / "model.onnx")
            return [["model.onnx", "model.onnx.data"]]
        names = [f"model_t{k}.onnx" for k in range(len(graphs))]
        save_graphs([(g, out_dir / n) for g, n in zip(graphs, names, strict=True)], out_dir / "model.data")
        return [[n, "model.data"] for n in names]

    def runner(self, artifact_dir: Path, manifest: Mapping[str, Any]) -> OnnxRunner:
        buckets = manifest["buckets"]
        return OnnxRunner(
            [artifact_dir / b["files"][0] for b in buckets],
            bucket_edges=[b["timestep_range"][0] for b in buckets[1:]],
            timestep_name=manifest["model"].get("timestep_input"),
            sample_name=manifest["model"].get("sample_input"),
        )
