"""The TFLite targets: `tflite-int8` (the Q/DQ graph lowered to int8 TFLite ops) and `tflite-fp32`
(the same lowering of the float graph, the baseline). Both run in the LiteRT interpreter.

TFLite tensors are static: the artifact is built for a fixed batch (`batch`, default 1, recorded in
the file's metadata) and the runner runs larger batches in chunks of it. A Reshape target computed
from the batch is folded into a constant, so resizing the input tensor afterwards would not be safe.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import onnx_graphsurgeon as gs

from qcompile.caps import TargetCaps
from qcompile.config import TargetName
from qcompile.pass_manager import Pass
from qcompile.passes.cleanup import NameNodes
from qcompile.passes.insert_qdq import InsertQDQ, QuantPlan
from qcompile.passes.static_shapes import StaticShapes
from qcompile.quant import TensorRange
from qcompile.targets.tflite import deps
from qcompile.targets.tflite.caps import TFLITE_FP32_CAPS, TFLITE_INT8_CAPS
from qcompile.targets.tflite.convert import write_model
from qcompile.targets.tflite.runner import TfliteRunner

DEFAULT_BATCH = 1
MODEL_FILE = "model.tflite"


class _TfliteTarget:
    name: TargetName
    caps: TargetCaps
    runtime_name = "litert"

    def __init__(self, batch: int = DEFAULT_BATCH):
        deps.schema()  # a missing extra fails here, once, with the package to install
        self.batch = batch

    def runtime_version(self) -> str:
        return deps.litert_version()

    def pipeline(self, plan: QuantPlan, ranges: Mapping[str, TensorRange], *,
                 timestep_input: str | None = None) -> list[Pass]:
        return [NameNodes(), InsertQDQ(plan, ranges, self.caps), StaticShapes(self.batch)]

    def emit(self, graphs: Sequence[gs.Graph], out_dir: Path) -> list[list[str]]:
        """One .tflite file; one subgraph and signature per timestep bucket ('bucket_0', ...), sharing
        the weight buffers. A single bucket gets the conventional 'serving_default' signature."""
        keys = ["serving_default"] if len(graphs) == 1 else [f"bucket_{k}" for k in range(len(graphs))]
        write_model(list(zip(keys, graphs, strict=True)), Path(out_dir) / MODEL_FILE, batch=self.batch)
        return [[MODEL_FILE] for _ in graphs]

    def runner(self, artifact_dir: Path, manifest: Mapping[str, Any]) -> TfliteRunner:
        buckets = manifest["buckets"]
        files = list(dict.fromkeys(b["files"][0] for b in buckets))  # one file may hold every bucket
        return TfliteRunner(
            [Path(artifact_dir) / f for f in files],
            bucket_edges=[b["timestep_range"][0] for b in buckets[1:]],
            timestep_name=manifest["model"].get("timestep_input"),
            sample_name=manifest["model"].get("sample_input"),
        )


class TfliteInt8Target(_TfliteTarget):
    name = TargetName.TFLITE_INT8
    caps = TFLITE_INT8_CAPS


class TfliteFp32Target(_TfliteTarget):
    name = TargetName.TFLITE_FP32
    caps = TFLITE_FP32_CAPS

    def pipeline(self, plan: QuantPlan, ranges: Mapping[str, TensorRange], *,
                 timestep_input: str | None = None) -> list[Pass]:
        return [NameNodes(), StaticShapes(self.batch)]
