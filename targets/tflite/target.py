"""The TFLite targets: `tflite-int8` (the Q/DQ graph lowered to int8 TFLite ops) and `tflite-fp32`
(the same lowering of the float graph, the baseline). Both run in the LiteRT interpreter.

TFLite tensors are static: the artifact is built for a fixed batch (`batch`, default 1, recorded in
the file's metadata) and the runner runs larger batches in chunks of it. A Reshape target computed
from the batch is folded into a constant, so resizing the input tensor afterwards would not be safe.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from qcompile.atomic import write_json
from qcompile.caps import TargetCaps
from qcompile.config import TargetName
from qcompile.evaluation.metrics import sqnr_db
from qcompile.graph_io import save_graphs
from qcompile.pass_manager import Pass
from qcompile.passes.cleanup import NameNodes
from qcompile.passes.fuse_groupnorm import FuseGroupNorm
from qcompile.passes.insert_qdq import InsertQDQ, QuantPlan
from qcompile.passes.static_shapes import StaticShapes
from qcompile.quant import TensorRange
from qcompile.targets.tflite import deps
from qcompile.targets.tflite.caps import TFLITE_FP32_CAPS, TFLITE_INT8_CAPS
from qcompile.targets.tflite.convert import write_model
from qcompile.targets.tflite.runner import THREADS, TfliteRunner
from qcompile.targets.tflite.validate import quantized_tensor_agreement, run_onnx_static

DEFAULT_BATCH = 1
MODEL_FILE = "model.tflite"
QDQ_DIR = "qdq"  # the Q/DQ ONNX graphs the .tflite was lowered from: its simulation, for validation
TENSOR_MAP = f"{QDQ_DIR}/tensors.json"


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
        return [NameNodes(), InsertQDQ(plan, ranges, self.caps), StaticShapes(self.batch), FuseGroupNorm()]

    def emit(self, graphs: Sequence[gs.Graph], out_dir: Path) -> list[list[str]]:
        """One .tflite file; one subgraph and signature per timestep bucket ('bucket_0', ...), sharing
        the weight buffers. A single bucket gets the conventional 'serving_default' signature."""
        self._write(graphs, Path(out_dir))
        return [[MODEL_FILE] for _ in graphs]

    def _write(self, graphs: Sequence[gs.Graph], out_dir: Path) -> tuple[list[str], dict[str, list]]:
        """(signature keys, the int8 tensors holding each signature's QuantizeLinear outputs)."""
        keys = ["serving_default"] if len(graphs) == 1 else [f"bucket_{k}" for k in range(len(graphs))]
        quantized: dict[str, list] = {}
        write_model(list(zip(keys, graphs, strict=True)), out_dir / MODEL_FILE, batch=self.batch, quantized=quantized)
        return keys, quantized

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

    def __init__(self, batch: int = DEFAULT_BATCH):
        super().__init__(batch)
        self._sdk_files: list[str] = []

    def emit(self, graphs: Sequence[gs.Graph], out_dir: Path) -> list[list[str]]:
        """The .tflite, and beside it (under qdq/, not read by the runner) the Q/DQ graphs it was lowered
        from with the map from their QuantizeLinear outputs to its int8 tensors: what `device_checks`
        compares, and what a user can rerun to reproduce the interpreter's numbers in onnxruntime."""
        out_dir = Path(out_dir)
        keys, quantized = self._write(graphs, out_dir)
        names = [f"{QDQ_DIR}/{key}.onnx" for key in keys]
        (out_dir / QDQ_DIR).mkdir(parents=True, exist_ok=True)
        save_graphs([(g, out_dir / n) for g, n in zip(graphs, names, strict=True)], out_dir / QDQ_DIR / "model.data")
        write_json(out_dir / TENSOR_MAP, {"buckets": [{"signature": key, "qdq": n, "quantized": quantized[key]}
                                                      for key, n in zip(keys, names, strict=True)]})
        self._sdk_files = [*names, f"{QDQ_DIR}/model.data", TENSOR_MAP]
        return [[MODEL_FILE] for _ in graphs]

    def sdk_files(self) -> list[str]:
        """The Q/DQ graphs and tensor map under qdq/: validation material, not run by the runner."""
        return list(self._sdk_files)

    def device_checks(self, artifact_dir: Path, manifest: Mapping[str, Any], *, adapter, held_out, reference,
                      artifact_runner: TfliteRunner, sampler, samples: int) -> dict[str, Any]:
        """The LiteRT interpreter against onnxruntime running the same Q/DQ graph, per bucket, on held-out
        inputs: every int8 activation compared in LSBs of its own scale, and the output as SQNR."""
        artifact_dir = Path(artifact_dir)
        device = f"LiteRT interpreter ({THREADS} threads) vs onnxruntime running the Q/DQ graph"
        if not (artifact_dir / TENSOR_MAP).is_file():  # an artifact from before qdq/ existed: nothing to compare
            print(f"[qcompile] {artifact_dir / TENSOR_MAP} missing: interpreter check skipped (rebuild to get it)")
            return {"device": device, "skipped": f"no {TENSOR_MAP}", "buckets": [], "summary": {}, "checks": {}}
        entries = json.loads((artifact_dir / TENSOR_MAP).read_text())["buckets"]
        batch = artifact_runner.programs[0].batch
        buckets = []
        for k, entry in enumerate(entries):
            key = entry["signature"]
            rows = artifact_runner.rows_of(k, held_out.count, held_out.timesteps)
            if len(rows) == 0:
                continue
            feed = held_out.take(rows)
            qdq = artifact_dir / entry["qdq"]
            tensors = quantized_tensor_agreement(artifact_dir / MODEL_FILE, key, qdq, entry["quantized"], feed,
                                                 batch=batch)
            local = max(tensors, key=lambda t: (t.local_max_lsb, t.local_fraction_differ), default=None)
            e2e = max(tensors, key=lambda t: (t.max_lsb, t.fraction_differ), default=None)
            output_sqnr = sqnr_db(run_onnx_static(qdq, feed, batch), artifact_runner.run_bucket(k, feed))
            buckets.append({
                "bucket": k, "signature": key, "inputs": len(rows), "int8_tensors": len(tensors),
                "local_max_lsb": local.local_max_lsb if local else 0,
                "local_fraction_differ": _mean([t.local_fraction_differ for t in tensors]),
                "local_worst": local.name if local else None,
                "end_to_end_max_lsb": e2e.max_lsb if e2e else 0,
                "end_to_end_fraction_differ": _mean([t.fraction_differ for t in tensors]),
                "end_to_end_worst": e2e.name if e2e else None,
                "output_vs_qdq_sqnr_db": round(float(output_sqnr), 2)})
        summary = {"lsb_local_max": max((b["local_max_lsb"] for b in buckets), default=0),
                   "lsb_local_fraction_differ": max((b["local_fraction_differ"] for b in buckets), default=0.0),
                   "lsb_end_to_end_max": max((b["end_to_end_max_lsb"] for b in buckets), default=0),
                   "interpreter_vs_qdq_sqnr_db_min": min((b["output_vs_qdq_sqnr_db"] for b in buckets), default=None)}
        compared = bool(buckets) and all(b["int8_tensors"] > 0 for b in buckets)
        return {"device": device + "; local: each int8 tensor from the interpreter's own upstream int8 tensors, "
                                   "op by op (every tensor preserved)",
                "buckets": buckets, "summary": summary,
                "checks": {"interpreter_within_1_lsb": compared and all(b["local_max_lsb"] <= 1 for b in buckets)}}


def _mean(values: list[float]) -> float:
    return round(float(np.mean(values)), 6) if values else 0.0


class TfliteFp32Target(_TfliteTarget):
    name = TargetName.TFLITE_FP32
    caps = TFLITE_FP32_CAPS

    def pipeline(self, plan: QuantPlan, ranges: Mapping[str, TensorRange], *,
                 timestep_input: str | None = None) -> list[Pass]:
        return [NameNodes(), StaticShapes(self.batch), FuseGroupNorm()]
