"""Proof on the HTP simulator: determinism, agreement with onnxruntime's CPU EP on the same Q/DQ graph,
and, when they disagree, the first tensor where they part.

The CPU EP runs the identical Q/DQ graph with onnxruntime's reference kernels, so any difference is
what the HTP backend computes differently (its requantization, its kernels, or a bug such as the
GroupNorm affine collapse this target rewrites away). To find where, every quantized activation of
the device graph is exposed as an output (its DequantizeLinear output, so both runtimes report it on
the same integer grid), both runtimes run the same inputs, and tensors are compared in graph order:
the first one whose SQNR falls below the tolerance is named with its producer and module path.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qcompile.evaluation.metrics import cosine, sqnr_db
from qcompile.graph_io import constant_values, load_graph, module_path, save_graph
from qcompile.passes.insert_qdq import activation_qdq_pair
from qcompile.passes.insert_qdq_integer import unrenamed
from qcompile.runtime import make_session, static_chunks
from qcompile.targets.qnn import ep

# Below this SQNR between HTP and the CPU EP an intermediate tensor counts as diverged. HTP rounds its
# requantizations and evaluates Sigmoid/Softmax differently, so at 8 bits the two runtimes drift apart
# by a few LSBs per layer (28-40 dB on the tiny UNet); a real backend bug (the GroupNorm affine
# collapse) falls to single digits. At 16 bits the runtimes agree to ~60 dB.
DIVERGENCE_SQNR_DB = {8: 20.0, 16: 40.0}
# The device check: HTP's output SQNR against fp32 may trail the CPU EP's by at most this much.
HTP_SQNR_SLACK_DB = 3.0
RUNS = 3


@dataclass(frozen=True)
class Divergence:
    tensor: str
    producer: str
    op: str
    module: str
    index: int  # position among the exposed activations, in graph order
    sqnr_db: float
    max_lsb: float  # largest |HTP - CPU| in steps of the tensor's scale

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ExposedTensor:
    output: str  # the dequantized tensor made a graph output
    tensor: str  # the activation it quantizes
    producer: str
    op: str
    module: str
    scale: float


def exposed_activations(model: Path, out_path: Path) -> tuple[Path, list[ExposedTensor]]:
    """A copy of the Q/DQ model with every activation's dequantized tensor as an extra output, and
    the exposed tensors in graph order."""
    graph = load_graph(model)
    outputs = list(graph.outputs)
    listed: list[ExposedTensor] = []
    known = {t.name for t in outputs}
    for node in graph.nodes:
        if node.op != "DequantizeLinear" or (pair := activation_qdq_pair(node.outputs[0])) is None:
            continue
        src = pair[0].inputs[0]
        producer = src.inputs[0] if src.inputs else None
        out = node.outputs[0]
        if out.name not in known:
            outputs.append(out)
            known.add(out.name)
        scale = float(np.asarray(constant_values(node.inputs[1])).reshape(-1)[0])
        listed.append(ExposedTensor(out.name, src.name, producer.name if producer is not None else "(input)",
                                    producer.op if producer is not None else "input",
                                    module_path(producer) if producer is not None else "", scale))
    graph.outputs = outputs
    return save_graph(graph, out_path), listed


def first_divergence(model: Path, feed: dict[str, np.ndarray], *, tolerance_db: float,
                     arch: int | None = None) -> Divergence | None:
    """The first quantized activation (graph order) where HTP and the CPU EP disagree, or None."""
    with tempfile.TemporaryDirectory(prefix="qcompile-qnn-expose-") as tmp:
        exposed, listed = exposed_activations(model, Path(tmp) / "exposed.onnx")
        names = [e.output for e in listed]
        htp = ep.htp_session(exposed, arch=arch)
        cpu = make_session(exposed, optimize=False)
        device_feed = {i.name: feed[i.name] for i in htp.get_inputs()}
        got = dict(zip(names, htp.run(names, device_feed), strict=True))
        want = dict(zip(names, cpu.run(names, device_feed), strict=True))
    for index, e in enumerate(listed):
        a, b = np.asarray(want[e.output], np.float64), np.asarray(got[e.output], np.float64)
        s = sqnr_db(a, b)
        if s < tolerance_db:
            return Divergence(e.tensor, e.producer, e.op, e.module, index, round(float(s), 3),
                              round(float(np.abs(a - b).max() / e.scale), 3))
    return None


def bucket_chunk(runner_htp, inputs: dict[str, np.ndarray]) -> tuple[int, dict[str, np.ndarray]]:
    """(bucket, one static batch): the bucket of the first row's timestep, the rows cut or padded to
    the device graph's batch."""
    bucket = 0
    if runner_htp.timestep_name is not None:
        bucket = runner_htp.bucket_of(float(np.asarray(inputs[runner_htp.timestep_name]).reshape(-1)[0]))
    n = len(np.asarray(inputs[runner_htp.input_names[0]]))
    rows = {k for k, v in inputs.items() if np.ndim(v) and len(v) == n}  # not Flux's ids, say
    chunk, _ = next(static_chunks({k: np.asarray(v) for k, v in inputs.items()}, runner_htp.batch, rows))
    return bucket, chunk


def check_on_htp(runner_htp, runner_cpu, reference, inputs: dict[str, np.ndarray], *, bits: int) -> dict[str, Any]:
    """Runs one static batch of `inputs` three times on HTP, once on the CPU EP and in fp32; on a
    mismatch (runs differ, or HTP trails the CPU EP against fp32) names the first diverging tensor."""
    bucket, chunk = bucket_chunk(runner_htp, inputs)
    runs = [runner_htp.run_chunk(bucket, chunk) for _ in range(RUNS)]
    cpu = runner_cpu.run_chunk(bucket, chunk)
    fp32 = np.asarray(reference.run(chunk))
    htp_minus_cpu = runs[0].astype(np.float64) - cpu
    result = {
        "bucket": bucket,
        "runs_identical": all(np.array_equal(runs[0], r) for r in runs[1:]),
        "htp_vs_fp32_sqnr_db": round(float(sqnr_db(fp32, runs[0])), 3),
        "cpu_vs_fp32_sqnr_db": round(float(sqnr_db(fp32, cpu)), 3),
        "htp_vs_cpu_sqnr_db": round(float(sqnr_db(cpu, runs[0])), 3),
        "htp_vs_fp32_cosine": round(float(cosine(fp32, runs[0])), 6),
        # A sampler integrates the mean error over every step, where SQNR hardly sees a bias of a fifth
        # of the error's std: HTP's low rounding of W8A8's 8-bit eps output was one (wide_graph_outputs).
        "htp_minus_cpu_mean": float(htp_minus_cpu.mean()),
        "htp_minus_cpu_mean_over_std": round(float(htp_minus_cpu.mean() / (htp_minus_cpu.std() + 1e-30)), 4),
        "first_divergence": None,
    }
    result["agrees"] = result["htp_vs_fp32_sqnr_db"] >= result["cpu_vs_fp32_sqnr_db"] - HTP_SQNR_SLACK_DB
    if not result["runs_identical"] or not result["agrees"]:
        found = first_divergence(runner_htp.paths[bucket], runner_htp.device_feed(chunk),
                                 tolerance_db=DIVERGENCE_SQNR_DB[bits], arch=runner_htp.htp_arch)
        result["first_divergence"] = None if found is None else found.as_dict()
    return result


class _FewLabels:
    """A SamplingSetup restricted to a few labels: the simulator costs about a second per sample-call."""

    def __init__(self, setup, count: int):
        self._setup = setup
        self._count = count

    def labels(self, per_class: int) -> np.ndarray:
        labels = self._setup.labels(1)
        return labels[np.linspace(0, len(labels) - 1, self._count).round().astype(int)]

    def __getattr__(self, name: str):
        return getattr(self._setup, name)


def sampling_on_htp(reference, runner_htp, runner_cpu, setup, sampler, *, samples: int, sample_name: str,
                    timestep_name: str) -> dict[str, Any]:
    """A short sampling run on HTP: per-step eps SQNR and CFG-gap ratio (teacher-forced, guided
    prediction), sample PSNR against fp32 and against the CPU EP running the same Q/DQ graph."""
    from qcompile.config import FidelitySettings
    from qcompile.evaluation.fidelity import evaluate_sampling
    from qcompile.evaluation.metrics import psnr_db
    from qcompile.evaluation.sampling import sample

    few = _FewLabels(setup, samples)
    result = evaluate_sampling(reference, runner_htp, few, FidelitySettings(sampler=sampler, per_class=1),
                               sample_name=sample_name, timestep_name=timestep_name, bucket_of=runner_htp.bucket_of)
    labels = few.labels(1)

    def cpu_call(x, t, cond):
        return np.asarray(runner_cpu.run({sample_name: x, timestep_name: t, setup.cond_input: cond}))

    images_cpu = np.clip(sample(cpu_call, sampler, cond=setup.conditioning(labels),
                                uncond=setup.null_conditioning(len(labels)), latent_shape=(len(labels),
                                *setup.latent_shape), scheduler_config=setup.scheduler_config), -1, 1)
    return {
        "samples": int(len(labels)),
        "sample_psnr_db_vs_fp32": result.summary["sample_psnr_db"],
        "sample_psnr_db_vs_cpu_ep": round(float(np.mean([psnr_db(a, b) for a, b in
                                                         zip(images_cpu, result.images_q, strict=True)])), 4),
        # the CPU EP on the same few images: the like-for-like yardstick for the HTP number above
        "cpu_ep_sample_psnr_db_vs_fp32": round(float(np.mean([psnr_db(a, b) for a, b in
                                                              zip(result.images_fp32, images_cpu, strict=True)])), 4),
        "accuracy_htp": result.summary["accuracy_q"],
        "per_step": [s.as_dict() for s in result.steps],
    }


def first_refused_prefix(model: Path, arch: int | None = None) -> tuple[str, str, str] | None:
    """When HTP refuses a whole graph, the smallest prefix it also refuses: the graph is cut after
    each quantized activation in turn (bisection over graph order). Returns (tensor, producer, op)
    of the activation whose addition makes HTP fail, or None if every prefix compiles.

    Prefix k is every node the first k+1 activations need, with each of those activations that is
    read outside the prefix as an output, so prefix k+1 contains prefix k and the bisection's answer
    is the first refusal in graph order. (Cutting at one tensor alone keeps only its ancestors; HTP's
    refusals depend on what else is in the graph, and tiny SD3's Reciprocal was then missed for a
    Slice 30 activations later.)"""
    graph = load_graph(model)
    cuts = [n.outputs[0].name for n in graph.nodes
            if n.op == "DequantizeLinear" and constant_values(n.inputs[0]) is None and n.inputs[0].inputs]

    def compiles(index: int, folder: Path) -> bool:
        g = load_graph(model)
        tensors = g.tensors()
        readers = {name: [c.name for c in tensors[name].outputs] for name in cuts[:index + 1]}
        g.outputs = [tensors[name] for name in cuts[:index + 1]]
        g.cleanup().toposort()
        inside = {n.name for n in g.nodes}
        g.outputs = [tensors[name] for name in cuts[:index + 1]
                     if name == cuts[index] or not readers[name] or any(r not in inside for r in readers[name])]
        g.cleanup().toposort()
        try:
            ep.htp_session(save_graph(g, folder / f"prefix{index}.onnx"), arch=arch)
        except Exception:  # noqa: BLE001 - any refusal counts
            return False
        return True

    with tempfile.TemporaryDirectory(prefix="qcompile-qnn-bisect-") as tmp:
        if not cuts or compiles(len(cuts) - 1, Path(tmp)):
            return None
        lo, hi = 0, len(cuts) - 1
        while lo < hi:
            mid = (lo + hi) // 2
            if compiles(mid, Path(tmp)):
                lo = mid + 1
            else:
                hi = mid
    dq = next(n for n in graph.nodes if n.op == "DequantizeLinear" and n.outputs[0].name == cuts[lo])
    src = dq.inputs[0].inputs[0].inputs[0]
    producer = src.inputs[0] if src.inputs else None
    name = unrenamed(src.name, {t.name for t in graph.outputs})
    return name, producer.name if producer is not None else "(input)", producer.op if producer is not None else ""
