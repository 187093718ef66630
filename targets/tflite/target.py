"""The TFLite targets: `tflite-int8` (the Q/DQ graph lowered to int8 TFLite ops) and `tflite-fp32`
(the same lowering of the float graph, the baseline). Both run in the LiteRT interpreter.

TFLite tensors are static: the artifact is built for a fixed batch (`batch`, default 1, recorded in
the file's metadata) and the runner runs larger batches in chunks of it. A Reshape target computed
from the batch is folded into a constant, so resizing the input tensor afterwards would not be safe.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from qcompile.atomic import write_json
from qcompile.caps import TargetCaps
from qcompile.config import TargetName
from qcompile.evaluation.metrics import sqnr_db
from qcompile.graph_io import save_graphs
from qcompile.manifest import Manifest
from qcompile.pass_manager import Pass, PassContext, PassManager
from qcompile.passes.cleanup import NameNodes
from qcompile.passes.fuse_groupnorm import FuseGroupNorm
from qcompile.passes.insert_qdq import InsertQDQ
from qcompile.passes.static_shapes import StaticShapes
from qcompile.target import BucketJob, CompiledBucket, DeviceEvidence, DeviceReport, EmitPurpose, EmitResult
from qcompile.targets.tflite import deps
from qcompile.targets.tflite.caps import TFLITE_FP32_CAPS, TFLITE_INT8_CAPS
from qcompile.targets.tflite.convert import write_model
from qcompile.targets.tflite.options import TfliteOptions
from qcompile.targets.tflite.runner import THREADS, TfliteRunner
from qcompile.targets.tflite.validate import quantized_tensor_agreement, run_onnx_static

MODEL_FILE = "model.tflite"
QDQ_DIR = "qdq"  # the Q/DQ ONNX graphs the .tflite was lowered from: its simulation, for validation
TENSOR_MAP = f"{QDQ_DIR}/tensors.json"


class _TfliteTarget:
    name: TargetName
    caps: TargetCaps
    runtime_name = "litert"

    def __init__(self, options: TfliteOptions | None = None):
        deps.schema()  # a missing extra fails here, once, with the package to install
        self.options = options or TfliteOptions()

    def runtime_version(self) -> str:
        return deps.litert_version()

    @property
    def static_batch(self) -> int:
        return self.options.batch

    def passes(self, job: BucketJob) -> list[Pass]:
        return [NameNodes(), InsertQDQ(job.plan, job.ranges, self.caps), StaticShapes(self.options.batch),
                FuseGroupNorm()]

    def compile_bucket(self, graph, job: BucketJob, ctx: PassContext) -> CompiledBucket:
        PassManager(self.passes(job), name=f"{self.name.value}/bucket{job.index}").run(graph, ctx)
        return CompiledBucket(job.index, graph)

    def emit(self, buckets: Sequence[CompiledBucket], out_dir: Path,
             purpose: EmitPurpose = EmitPurpose.ARTIFACT) -> EmitResult:
        """One .tflite file; one subgraph and signature per timestep bucket ('bucket_0', ...), sharing
        the weight buffers. A single bucket gets the conventional 'serving_default' signature."""
        self._write(buckets, Path(out_dir))
        return EmitResult(tuple((MODEL_FILE,) for _ in buckets), device=self.device_record())

    def device_record(self) -> dict[str, int]:
        """The manifest's `device`: the static batch the file is built for."""
        return {"static_batch": self.options.batch}

    def _write(self, buckets: Sequence[CompiledBucket], out_dir: Path) -> tuple[list[str], dict[str, list]]:
        """(signature keys, the int8 tensors holding each signature's QuantizeLinear outputs)."""
        keys = ["serving_default"] if len(buckets) == 1 else [f"bucket_{b.index}" for b in buckets]
        quantized: dict[str, list] = {}
        write_model([(k, b.graph) for k, b in zip(keys, buckets, strict=True)], out_dir / MODEL_FILE,
                    batch=self.options.batch, quantized=quantized)
        return keys, quantized

    def runner(self, folder: Path, manifest: Manifest) -> TfliteRunner:
        files = list(dict.fromkeys(manifest.bucket_files(folder)))  # one file may hold every bucket
        return TfliteRunner(files, bucket_edges=manifest.bucket_edges, timestep_name=manifest.model.timestep_input,
                            sample_name=manifest.model.sample_input)

    def device_checks(self, folder: Path, manifest: Manifest, evidence: DeviceEvidence) -> DeviceReport | None:
        return None


class TfliteInt8Target(_TfliteTarget):
    name = TargetName.TFLITE_INT8
    caps = TFLITE_INT8_CAPS

    def emit(self, buckets: Sequence[CompiledBucket], out_dir: Path,
             purpose: EmitPurpose = EmitPurpose.ARTIFACT) -> EmitResult:
        """The .tflite, and beside it (under qdq/, not read by the runner) the Q/DQ graphs it was lowered
        from with the map from their QuantizeLinear outputs to its int8 tensors: what `device_checks`
        compares, and what a user can rerun to reproduce the interpreter's numbers in onnxruntime."""
        if purpose is EmitPurpose.PROBE:
            return super().emit(buckets, out_dir, purpose)
        out_dir = Path(out_dir)
        keys, quantized = self._write(buckets, out_dir)
        names = [f"{QDQ_DIR}/{key}.onnx" for key in keys]
        (out_dir / QDQ_DIR).mkdir(parents=True, exist_ok=True)
        save_graphs([(b.graph, out_dir / n) for b, n in zip(buckets, names, strict=True)],
                    out_dir / QDQ_DIR / "model.data")
        write_json(out_dir / TENSOR_MAP, {"buckets": [{"signature": key, "qdq": n, "quantized": quantized[key]}
                                                      for key, n in zip(keys, names, strict=True)]})
        return EmitResult(tuple((MODEL_FILE,) for _ in buckets),
                          sdk_files=(*names, f"{QDQ_DIR}/model.data", TENSOR_MAP), device=self.device_record())

    def device_checks(self, folder: Path, manifest: Manifest, evidence: DeviceEvidence) -> DeviceReport:
        """The LiteRT interpreter against onnxruntime running the same Q/DQ graph, for every bucket, on
        held-out inputs of that bucket: every int8 activation compared in LSBs of its own scale, and the
        output as SQNR. A missing tensor map fails the check (nothing could be compared)."""
        folder = Path(folder)
        device = f"LiteRT interpreter ({THREADS} threads) vs onnxruntime running the Q/DQ graph"
        if not (folder / TENSOR_MAP).is_file():
            return DeviceReport(device, (), {}, {"interpreter_within_1_lsb": False},
                                {"error": f"{TENSOR_MAP} is missing: nothing to compare the interpreter with"})
        entries = json.loads((folder / TENSOR_MAP).read_text())["buckets"]
        runner = evidence.artifact_runner
        held_out = evidence.held_out
        buckets = []
        for k, entry in enumerate(entries):
            key = entry["signature"]
            rows = runner.rows_of(k, held_out.count, held_out.timesteps)
            if len(rows) == 0:
                continue
            feed = held_out.take(rows)
            qdq = folder / entry["qdq"]
            # One model open at a time: the tensor check's interpreter and sessions, then onnxruntime on
            # the Q/DQ graph, then the evaluation's interpreter, let go again before the next bucket.
            tensors = quantized_tensor_agreement(folder / MODEL_FILE, key, qdq, entry["quantized"], feed,
                                                 batch=self.options_of(manifest).batch)
            local = max(tensors, key=lambda t: (t.local_max_lsb, t.local_fraction_differ), default=None)
            e2e = max(tensors, key=lambda t: (t.max_lsb, t.fraction_differ), default=None)
            expected = run_onnx_static(qdq, feed, self.options_of(manifest).batch)
            output_sqnr = sqnr_db(expected, runner.run_bucket(k, feed))
            runner.release()
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
        unchecked = sorted(set(range(len(entries))) - {b["bucket"] for b in buckets})
        compared = bool(buckets) and not unchecked and all(b["int8_tensors"] > 0 for b in buckets)
        return DeviceReport(
            device + "; local: each int8 tensor from the interpreter's own upstream int8 tensors, op by op "
                     "(every tensor preserved)",
            tuple(buckets), summary,
            {"interpreter_within_1_lsb": compared and all(b["local_max_lsb"] <= 1 for b in buckets)},
            {"unchecked_buckets": unchecked})

    @staticmethod
    def options_of(manifest: Manifest) -> TfliteOptions:
        """The options an artifact was built with (its static batch), from its manifest."""
        return TfliteOptions(batch=int(manifest.device.get("static_batch", TfliteOptions().batch)))


def _mean(values: list[float]) -> float:
    return round(float(np.mean(values)), 6) if values else 0.0


class TfliteFp32Target(_TfliteTarget):
    name = TargetName.TFLITE_FP32
    caps = TFLITE_FP32_CAPS

    def passes(self, job: BucketJob) -> list[Pass]:
        return [NameNodes(), StaticShapes(self.options.batch), FuseGroupNorm()]
