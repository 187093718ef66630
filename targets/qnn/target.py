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
SDK users the float device graph (`float/model.onnx`) with one AIMET-style encodings file per bucket,
for `qnn-onnx-converter --quantization_overrides`; for devices, the bucket graphs compiled into QNN
context binaries (`context/`: one weight-shared binary for all buckets), see `context.py`.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from qcompile.caps import TargetCaps
from qcompile.config import TargetName
from qcompile.errors import UserError
from qcompile.graph_io import save_graph, save_graphs
from qcompile.pass_manager import GraphProperty, Pass, PassContext, PassResult
from qcompile.passes.bound_attention_mask import BoundAttentionMask
from qcompile.passes.cleanup import NameNodes
from qcompile.passes.einsum_as_transpose import EinsumAsTranspose
from qcompile.passes.fuse_rmsnorm import FuseRMSNorm
from qcompile.passes.groupnorm_affine_conv import GroupNormAffineAsConv
from qcompile.passes.host_time_embedding import MoveTimeEmbeddingToHost, TimeEmbeddingCut
from qcompile.passes.infer_shapes import InferShapes
from qcompile.passes.insert_qdq import QuantPlan
from qcompile.passes.insert_qdq_integer import InsertQDQEverywhere
from qcompile.passes.linear_as_gemm import LinearAsGemm
from qcompile.passes.remove_nan_guards import RemoveNanGuards
from qcompile.passes.static_shapes import StaticShapes
from qcompile.passes.unpatchify_depth_to_space import UnpatchifyAsDepthToSpace
from qcompile.passes.wide_graph_outputs import WideGraphOutputs
from qcompile.quant import TensorRange
from qcompile.targets.qnn import ep
from qcompile.targets.qnn.caps import QNN_W8A8_CAPS, QNN_W8A16_CAPS
from qcompile.targets.qnn.context import CONTEXT_DIR, check_contexts, write_contexts
from qcompile.targets.qnn.encodings import write_encodings
from qcompile.targets.qnn.runner import HOST_FILE, QnnRunner
from qcompile.targets.qnn.validate import bucket_chunk, check_on_htp, first_refused_prefix, sampling_on_htp

DEFAULT_BATCH = 2  # one classifier-free-guidance pair per call
FLOAT_DIR = "float"


class KeepFloatGraph(Pass):
    """Keeps a copy of the graph as it is at this point of the pipeline (the float device graph)."""

    name = "keep-float-graph"
    preserves = frozenset(GraphProperty)

    def __init__(self):
        self.graph: gs.Graph | None = None

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        self.graph = graph.copy()
        return PassResult(modified=False)


class _QnnTarget:
    name: TargetName
    caps: TargetCaps
    runtime_name = "onnxruntime CPU EP running the HTP's Q/DQ graph (device checks: QNN HTP simulator)"

    def __init__(self, batch: int = DEFAULT_BATCH, cut: TimeEmbeddingCut = TimeEmbeddingCut.FULL,
                 htp_arch: int | None = None):
        ep.qnn_module()  # a missing extra fails here, once, with the package to install
        self.batch = batch
        self.cut = cut
        self.htp_arch = htp_arch
        self._host: MoveTimeEmbeddingToHost | None = None
        self._float: KeepFloatGraph | None = None
        self._sdk_files: list[str] = []
        self._context_error: str | None = None

    def runtime_version(self) -> str:
        return ep.runtime_version()

    def pipeline(self, plan: QuantPlan, ranges: Mapping[str, TensorRange], *,
                 timestep_input: str | None = None) -> list[Pass]:
        """The passes for one bucket. The host-embedding pass and a snapshot of the float device graph
        are kept on the target: `emit` writes them once, beside the buckets' Q/DQ models."""
        static = StaticShapes(self.batch)
        passes: list[Pass] = [NameNodes(), static]
        # Without a timestep too: a text encoder's token ids and the embedding lookup they index (which
        # HTP refuses, as it refused DiT's class-label lookup) go to the host.
        self._host = MoveTimeEmbeddingToHost(timestep_input, self.cut, static_shapes=static)
        self._float = KeepFloatGraph()
        passes.append(self._host)
        return [*passes, RemoveNanGuards(), BoundAttentionMask(ranges), EinsumAsTranspose(), InferShapes(),
                UnpatchifyAsDepthToSpace(), FuseRMSNorm(), LinearAsGemm(), GroupNormAffineAsConv(), InferShapes(),
                self._float, InsertQDQEverywhere(ranges, self.caps), WideGraphOutputs(self.caps), InferShapes()]

    def emit(self, graphs: Sequence[gs.Graph], out_dir: Path) -> list[list[str]]:
        out_dir = Path(out_dir)
        extra: list[str] = []
        if self._host is not None and self._host.host_graph is not None:
            save_graph(self._host.host_graph, out_dir / HOST_FILE)
            extra = [HOST_FILE, HOST_FILE + ".data"]
        if len(graphs) == 1:
            save_graph(graphs[0], out_dir / "model.onnx")
            files = [["model.onnx", "model.onnx.data"]]
        else:
            names = [f"model_t{k}.onnx" for k in range(len(graphs))]
            save_graphs([(g, out_dir / n) for g, n in zip(graphs, names, strict=True)], out_dir / "model.data")
            files = [[n, "model.data"] for n in names]
        float_graph = self._float.graph
        save_graph(float_graph, out_dir / FLOAT_DIR / "model.onnx")
        self._sdk_files = [f"{FLOAT_DIR}/model.onnx", f"{FLOAT_DIR}/model.onnx.data"]
        for k, graph in enumerate(graphs):
            name = f"{FLOAT_DIR}/encodings_t{k}.json" if len(graphs) > 1 else f"{FLOAT_DIR}/encodings.json"
            write_encodings(graph, float_graph, out_dir / name)
            self._sdk_files.append(name)
        self._sdk_files += self._contexts([out_dir / f[0] for f in files], out_dir)
        return [[*f, *extra] for f in files]

    def _contexts(self, models: list[Path], out_dir: Path) -> list[str]:
        """Context binaries for devices (one weight-shared binary for several buckets). When compiling
        fails, none are written and the error goes into the manifest: a graph HTP refuses fails the
        device check, which names the first activation it refuses; otherwise the check reports the
        missing binaries as a failure."""
        where = f" for HTP v{self.htp_arch}" if self.htp_arch is not None else ""
        print(f"[qcompile] qnn: compiling {len(models)} graph(s) into context binaries{where}", flush=True)
        self._context_error = None
        try:
            written = write_contexts(models, out_dir / CONTEXT_DIR, shared=len(models) > 1, arch=self.htp_arch)
        except UserError as exc:
            shutil.rmtree(out_dir / CONTEXT_DIR, ignore_errors=True)
            self._context_error = str(exc)
            print(f"[qcompile] qnn: no context binaries: {exc}", flush=True)
            return []
        return [p.relative_to(out_dir).as_posix() for p in written]

    def device_record(self) -> dict[str, Any]:
        """The manifest's `device`: the HTP architecture the context binaries are compiled for (and the
        simulator emulates when it runs this artifact); None is the QNN backend's default."""
        record: dict[str, Any] = {"htp_arch": self.htp_arch}
        if self._context_error is not None:
            record["context_error"] = self._context_error
        return record

    def sdk_files(self) -> list[str]:
        """Files for QNN SDK users (float device graph, encodings per bucket), not run by the runner."""
        return list(self._sdk_files)

    def runner(self, artifact_dir: Path, manifest: Mapping[str, Any], *, htp: bool = False) -> QnnRunner:
        """The Q/DQ graphs on onnxruntime's CPU EP (`htp=True`: on the HTP simulator).

        The broad evaluation (hundreds of sampling calls) runs on the CPU EP: the x86 simulator costs
        about a second per sample per call even for the 16x16 reference model. What HTP itself
        computes is proven by `device_checks` on the same graphs."""
        buckets = manifest["buckets"]
        host = Path(artifact_dir) / HOST_FILE
        return QnnRunner(
            [Path(artifact_dir) / b["files"][0] for b in buckets],
            host=host if host.is_file() else None,
            bucket_edges=[b["timestep_range"][0] for b in buckets[1:]],
            timestep_name=manifest["model"].get("timestep_input"),
            sample_name=manifest["model"].get("sample_input"),
            htp=htp,
            htp_arch=self.artifact_arch(manifest),
        )

    def artifact_arch(self, manifest: Mapping[str, Any]) -> int | None:
        """The HTP architecture an artifact was compiled for (its manifest), else this target's."""
        return (manifest.get("device") or {}).get("htp_arch", self.htp_arch)

    def device_checks(self, artifact_dir: Path, manifest: Mapping[str, Any], *, adapter, held_out, reference,
                      artifact_runner: QnnRunner, sampler, samples: int) -> dict[str, Any]:
        """On the HTP simulator: per bucket, three identical runs and agreement with the CPU EP (naming
        the first diverging tensor otherwise); for models that sample, a short sampling run.
        `artifact_runner` is the CPU-EP runner the evaluation already holds."""
        try:
            htp = self.runner(artifact_dir, manifest, htp=True)
        except UserError as exc:  # name what HTP cannot take: bisect the first bucket's graph
            found = first_refused_prefix(Path(artifact_dir) / manifest["buckets"][0]["files"][0],
                                         self.artifact_arch(manifest))
            where = "" if found is None else f"; the first activation it refuses is '{found[0]}' from node " \
                                             f"'{found[1]}' ({found[2]})"
            raise UserError(f"{exc}{where}") from exc
        buckets, chunks = [], {}
        timesteps = held_out.timesteps
        for k in range(htp.buckets):
            rows = htp.rows_of(k, held_out.count, timesteps)
            if len(rows) == 0:
                continue
            feed = held_out.take(rows[:htp.batch])
            buckets.append(check_on_htp(htp, artifact_runner, reference, feed, bits=self.caps.activation_dtype.bits))
            chunks[k] = bucket_chunk(htp, feed)[1]
        out: dict[str, Any] = {"device": "QNN HTP simulator (x86_64), CPU fallback disabled",
                               "static_batch": htp.batch, "buckets": buckets}
        context_error = (manifest.get("device") or {}).get("context_error")
        if context_error is not None:
            out["context"] = {"identical": False, "error": context_error}
        elif (Path(artifact_dir) / CONTEXT_DIR).is_dir():  # artifacts from before context binaries have none
            # every bucket's binary is checked: identity needs inputs, not inputs of the bucket's timesteps
            any_rows = bucket_chunk(htp, held_out.take(np.arange(min(htp.batch, held_out.count))))[1]
            out["context"] = check_contexts(Path(artifact_dir), htp,
                                            {k: chunks.get(k, any_rows) for k in range(htp.buckets)})
        setup = adapter.sampling()
        if setup is not None and htp.timestep_name is not None and samples > 0:
            out["sampling"] = sampling_on_htp(reference, htp, artifact_runner, setup, sampler, samples=samples,
                                              sample_name=htp.sample_name, timestep_name=htp.timestep_name)
        out["checks"] = {"htp_deterministic": all(b["runs_identical"] for b in buckets),
                         "htp_agrees_with_cpu_ep": all(b["agrees"] for b in buckets)}
        if "context" in out:
            out["checks"]["context_binary_identical"] = out["context"]["identical"]
        summary = {"htp_vs_fp32_sqnr_db_min": min(b["htp_vs_fp32_sqnr_db"] for b in buckets),
                   "htp_vs_cpu_ep_sqnr_db_min": min(b["htp_vs_cpu_sqnr_db"] for b in buckets),
                   "htp_cosine_min": min(b["htp_vs_fp32_cosine"] for b in buckets),
                   "htp_vs_cpu_ep_mean_error_max": max((b["htp_minus_cpu_mean"] for b in buckets), key=abs)}
        if "sampling" in out:
            summary.update({f"htp_{k}": out["sampling"][k] for k in
                            ("sample_psnr_db_vs_fp32", "sample_psnr_db_vs_cpu_ep", "cpu_ep_sample_psnr_db_vs_fp32",
                             "accuracy_htp")})
        if "binary_bytes" in out.get("context", {}):
            summary.update({"htp_context_bytes": out["context"]["binary_bytes"],
                            "htp_context_weight_shared": out["context"]["weight_shared"],
                            "htp_context_identical": out["context"]["identical"]})
        out["summary"] = summary
        return out


class QnnW8A8Target(_QnnTarget):
    name = TargetName.QNN_W8A8
    caps = QNN_W8A8_CAPS


class QnnW8A16Target(_QnnTarget):
    name = TargetName.QNN_W8A16
    caps = QNN_W8A16_CAPS
