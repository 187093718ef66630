"""The QNN targets `qnn-w8a8` and `qnn-w8a16`: integer-only Q/DQ ONNX for Qualcomm's HTP NPU.

Pipeline per timestep bucket, on the canonical float graph:
1. static shapes at a fixed batch (QNN graphs are static; the runner runs larger batches in chunks);
2. the timestep embedding moves to the host (`host_time_embedding.onnx`, float, run by onnxruntime
   on the CPU), its outputs become device inputs;
3. HTP-safe rewrites (GroupNorm affine as a depthwise 1x1 Conv, permuting Einsum as Transpose, the
   6-D unpatchify as DepthToSpace, RMSNorm as one node, MatMul + bias as Gemm) and integer-safe ones (SDPA's NaN guards
   dropped, "minus infinity" attention masks bounded by the scores' range);
4. every float tensor and constant quantized (`insert_qdq_integer`); at W8A8 the graph outputs, and
   the op computing each, at 16 bits (`wide_graph_outputs`).

Files: one Q/DQ model per bucket sharing one weight file (as `ort-int8`), the host model, and for QNN
SDK users each bucket's float device graph (`float/model.onnx`, or `float/model_t{k}.onnx` for K
buckets) with its AIMET-style encodings file, for `qnn-onnx-converter --quantization_overrides`; for
devices, the bucket graphs compiled into QNN context binaries (`context/`: one weight-shared binary for
all buckets), see `context.py`.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx_graphsurgeon as gs

from qcompile.caps import TargetCaps
from qcompile.config import TargetName
from qcompile.errors import UserError
from qcompile.graph_io import save_bucket_graphs, save_graph
from qcompile.manifest import Manifest
from qcompile.pass_manager import GraphProperty, Pass, PassContext, PassManager, PassResult
from qcompile.passes.bound_attention_mask import BoundAttentionMask
from qcompile.passes.cleanup import NameNodes
from qcompile.passes.einsum_as_transpose import EinsumAsTranspose
from qcompile.passes.fuse_rmsnorm import FuseRMSNorm
from qcompile.passes.groupnorm_affine_conv import GroupNormAffineAsConv
from qcompile.passes.host_time_embedding import MoveTimeEmbeddingToHost, TimeEmbeddingCut
from qcompile.passes.infer_shapes import InferShapes
from qcompile.passes.insert_qdq_integer import InsertQDQEverywhere
from qcompile.passes.linear_as_gemm import LinearAsGemm
from qcompile.passes.remove_nan_guards import RemoveNanGuards
from qcompile.passes.static_shapes import StaticShapes
from qcompile.passes.unpatchify_depth_to_space import UnpatchifyAsDepthToSpace
from qcompile.passes.wide_graph_outputs import WideGraphOutputs
from qcompile.passes.widen_activations import WidenActivations
from qcompile.target import BucketJob, CompiledBucket, DeviceEvidence, DeviceReport, EmitPurpose, EmitResult
from qcompile.targets.qnn import ep
from qcompile.targets.qnn.caps import QNN_W8A8_CAPS, QNN_W8A16_CAPS
from qcompile.targets.qnn.context import CONTEXT_DIR, check_contexts, write_contexts
from qcompile.targets.qnn.encodings import write_encodings
from qcompile.targets.qnn.options import QnnOptions
from qcompile.targets.qnn.runner import HOST_FILE, QnnRunner
from qcompile.targets.qnn.validate import bucket_chunk, check_on_htp, first_refused_prefix, sampling_on_htp

FLOAT_DIR = "float"


class KeepFloatGraph(Pass):
    """Keeps a copy of the graph as it is at this point of the pipeline (the float device graph)."""

    name = "keep-float-graph"
    preserves = frozenset(GraphProperty)

    def __init__(self):
        self.graph: gs.Graph | None = None

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        from qcompile.graph_io import copy_graph

        self.graph = copy_graph(graph)
        return PassResult(modified=False)


class _QnnTarget:
    name: TargetName
    caps: TargetCaps
    runtime_name = "onnxruntime CPU EP running the HTP's Q/DQ graph (device checks: QNN HTP simulator)"

    def __init__(self, options: QnnOptions | None = None, cut: TimeEmbeddingCut = TimeEmbeddingCut.FULL):
        ep.qnn_module()  # a missing extra fails here, once, with the package to install
        self.options = options or QnnOptions()
        self.cut = cut

    def runtime_version(self) -> str:
        return ep.runtime_version()

    @property
    def static_batch(self) -> int:
        return self.options.batch

    def compile_bucket(self, graph: gs.Graph, job: BucketJob, ctx: PassContext) -> CompiledBucket:
        """The passes for one bucket. The host-embedding pass and a snapshot of the float device graph
        hand their graphs to `emit` through the CompiledBucket."""
        static = StaticShapes(self.options.batch)
        # Without a timestep too: a text encoder's token ids and the embedding lookup they index (which
        # HTP refuses, as it refused DiT's class-label lookup) go to the host.
        host = MoveTimeEmbeddingToHost(job.timestep_input, self.cut, static_shapes=static)
        keep = KeepFloatGraph()
        passes = [NameNodes(), static, host, RemoveNanGuards(), BoundAttentionMask(job.ranges), EinsumAsTranspose(),
                  InferShapes(), UnpatchifyAsDepthToSpace(), FuseRMSNorm(), LinearAsGemm(), GroupNormAffineAsConv(),
                  InferShapes(), keep, InsertQDQEverywhere(job.ranges, self.caps),
                  WidenActivations(job.plan.excluded, self.caps), WideGraphOutputs(self.caps), InferShapes()]
        PassManager(passes, name=f"{self.name.value}/bucket{job.index}").run(graph, ctx)
        return CompiledBucket(job.index, graph, host_graph=host.host_graph, float_graph=keep.graph)

    def emit(self, buckets: Sequence[CompiledBucket], out_dir: Path,
             purpose: EmitPurpose = EmitPurpose.ARTIFACT) -> EmitResult:
        """The bucket models (one weight file), the host graph (the same for every bucket: it computes
        from the timestep alone, no calibrated range enters it), and for SDK users each bucket's float
        device graph (they differ where a pass used the bucket's ranges, e.g. bounded attention masks)
        with its encodings; for devices the context binaries."""
        out_dir = Path(out_dir)
        extra: tuple[str, ...] = ()
        host = buckets[0].host_graph
        if host is not None:
            save_graph(host, out_dir / HOST_FILE)
            extra = (HOST_FILE, HOST_FILE + ".data")
        files = save_bucket_graphs([b.graph for b in buckets], out_dir)
        if purpose is EmitPurpose.PROBE:
            return EmitResult(tuple((*f, *extra) for f in files), device={"htp_arch": self.options.htp_arch})
        float_files = save_bucket_graphs([b.float_graph for b in buckets], out_dir / FLOAT_DIR)
        sdk: list[str] = [f"{FLOAT_DIR}/{f}" for f in dict.fromkeys(f for fs in float_files for f in fs)]
        for b in buckets:
            name = f"{FLOAT_DIR}/encodings_t{b.index}.json" if len(buckets) > 1 else f"{FLOAT_DIR}/encodings.json"
            write_encodings(b.graph, b.float_graph, out_dir / name)
            sdk.append(name)
        contexts, context_error = self._contexts([out_dir / f[0] for f in files], out_dir)
        device: dict[str, Any] = {"htp_arch": self.options.htp_arch, "static_batch": self.options.batch}
        if context_error is not None:
            device["context_error"] = context_error
        return EmitResult(tuple((*f, *extra) for f in files), sdk_files=(*sdk, *contexts), device=device)

    def _contexts(self, models: list[Path], out_dir: Path) -> tuple[list[str], str | None]:
        """Context binaries for devices (one weight-shared binary for several buckets), or the error that
        stopped them. When compiling fails, none are written and the error goes into the manifest: a
        graph HTP refuses fails the device check, which names the first activation it refuses;
        otherwise the check reports the missing binaries as a failure."""
        arch = self.options.htp_arch
        where = f" for HTP v{arch}" if arch is not None else ""
        print(f"[qcompile] qnn: compiling {len(models)} graph(s) into context binaries{where}", flush=True)
        try:
            written = write_contexts(models, out_dir / CONTEXT_DIR, shared=len(models) > 1, arch=arch)
        except UserError as exc:
            shutil.rmtree(out_dir / CONTEXT_DIR, ignore_errors=True)
            print(f"[qcompile] qnn: no context binaries: {exc}", flush=True)
            return [], str(exc)
        return [p.relative_to(out_dir).as_posix() for p in written], None

    def runner(self, folder: Path, manifest: Manifest, *, htp: bool = False) -> QnnRunner:
        """The Q/DQ graphs on onnxruntime's CPU EP (`htp=True`: on the HTP simulator).

        The broad evaluation (hundreds of sampling calls) runs on the CPU EP: the x86 simulator costs
        about a second per sample per call even for the 16x16 reference model. What HTP itself
        computes is proven by `device_checks` on the same graphs."""
        host = Path(folder) / HOST_FILE
        return QnnRunner(manifest.bucket_files(folder), host=host if host.is_file() else None,
                         bucket_edges=manifest.bucket_edges, timestep_name=manifest.model.timestep_input,
                         sample_name=manifest.model.sample_input, htp=htp, htp_arch=self.artifact_arch(manifest))

    def artifact_arch(self, manifest: Manifest) -> int | None:
        """The HTP architecture an artifact was compiled for (its manifest), else this target's."""
        return manifest.device.get("htp_arch", self.options.htp_arch)

    def device_checks(self, folder: Path, manifest: Manifest, evidence: DeviceEvidence) -> DeviceReport:
        """On the HTP simulator: per bucket, three identical runs and agreement with the CPU EP (naming
        the first diverging tensor otherwise); for models that sample, a short sampling run."""
        folder = Path(folder)
        try:
            htp = self.runner(folder, manifest, htp=True)
        except UserError as exc:  # name what HTP cannot take: bisect the first bucket's graph
            found = first_refused_prefix(manifest.bucket_files(folder)[0], self.artifact_arch(manifest))
            where = "" if found is None else f"; the first activation it refuses is '{found[0]}' from node " \
                                             f"'{found[1]}' ({found[2]})"
            raise UserError(f"{exc}{where}") from exc
        held_out, reference, cpu_runner = evidence.held_out, evidence.reference, evidence.artifact_runner
        buckets, chunks = [], {}
        for k in range(htp.buckets):
            rows = htp.rows_of(k, held_out.count, held_out.timesteps)
            if len(rows) == 0:
                continue
            feed = held_out.take(rows[:htp.batch])
            buckets.append(check_on_htp(htp, cpu_runner, reference, feed, bits=self.caps.activation_dtype.bits))
            chunks[k] = bucket_chunk(htp, feed)[1]
        unchecked = sorted(set(range(htp.buckets)) - set(chunks))
        details: dict[str, Any] = {"static_batch": htp.batch, "unchecked_buckets": unchecked}
        context_error = manifest.device.get("context_error")
        if context_error is not None:
            details["context"] = {"identical": False, "error": context_error}
        elif (folder / CONTEXT_DIR).is_dir():
            details["context"] = check_contexts(folder, htp, chunks)
        setup = evidence.adapter.sampling()
        if setup is not None and htp.timestep_name is not None and evidence.samples > 0:
            details["sampling"] = sampling_on_htp(reference, htp, cpu_runner, setup, evidence.sampler,
                                                  samples=evidence.samples, sample_name=htp.sample_name,
                                                  timestep_name=htp.timestep_name)
        checks = {"htp_deterministic": bool(buckets) and not unchecked and all(b["runs_identical"] for b in buckets),
                  "htp_agrees_with_cpu_ep": bool(buckets) and not unchecked and all(b["agrees"] for b in buckets)}
        if "context" in details:  # named for what ran: the shipped binary, or each bucket recompiled unshared
            shipped = details["context"].get("shipped_verified", False) or not details["context"].get("weight_shared")
            key = "context_binary_identical" if shipped else "bucket_contexts_identical"
            checks[key] = details["context"]["identical"]
        summary = {"htp_vs_fp32_sqnr_db_min": min(b["htp_vs_fp32_sqnr_db"] for b in buckets),
                   "htp_vs_cpu_ep_sqnr_db_min": min(b["htp_vs_cpu_sqnr_db"] for b in buckets),
                   "htp_cosine_min": min(b["htp_vs_fp32_cosine"] for b in buckets),
                   "htp_vs_cpu_ep_mean_error_max": max((b["htp_minus_cpu_mean"] for b in buckets), key=abs)}
        if "sampling" in details:
            summary.update({f"htp_{k}": details["sampling"][k] for k in
                            ("sample_psnr_db_vs_fp32", "sample_psnr_db_vs_cpu_ep", "cpu_ep_sample_psnr_db_vs_fp32",
                             "accuracy_htp")})
        if "binary_bytes" in details.get("context", {}):
            summary.update({"htp_context_bytes": details["context"]["binary_bytes"],
                            "htp_context_weight_shared": details["context"]["weight_shared"],
                            "htp_context_identical": details["context"]["identical"],
                            "htp_context_shipped_verified": details["context"]["shipped_verified"]})
        return DeviceReport("QNN HTP simulator (x86_64), CPU fallback disabled", tuple(buckets), summary, checks,
                            details)


class QnnW8A8Target(_QnnTarget):
    name = TargetName.QNN_W8A8
    caps = QNN_W8A8_CAPS


class QnnW8A16Target(_QnnTarget):
    name = TargetName.QNN_W8A16
    caps = QNN_W8A16_CAPS
