"""Layer sensitivity and mixed precision: which weighted layers cost the most fidelity when quantized,
and the fewest to keep in float to reach a requested output SQNR.

Sensitivity is measured directly, not estimated: for each candidate layer a graph with only that
layer quantized runs on recorded inputs spread over the timesteps, and its output SQNR against the
float model is the layer's score (low = sensitive). Mixed precision then keeps the most sensitive
layers in float, the count found by bisection over the sensitivity order (each probe is a full
quantized graph, so interactions between layers are measured, not assumed away).

"Float" is what the target can fall back to (`TargetCaps.fallback`): on an integer-only NPU a layer
taken out of the 8-bit graph keeps its 8-bit weights and computes with 16-bit activations instead.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx_graphsurgeon as gs
from tqdm import tqdm

from qcompile.calibration.inputs import InputSet
from qcompile.evaluation.metrics import sqnr_db
from qcompile.graph_io import copy_graph, module_path
from qcompile.manifest import BucketRecord, Manifest
from qcompile.pass_manager import PassContext
from qcompile.passes.insert_qdq import plan_quantization
from qcompile.quant import TensorRange
from qcompile.runtime import OnnxRunner
from qcompile.target import BucketJob, EmitPurpose


@dataclass(frozen=True)
class LayerSensitivity:
    node: str
    module: str
    op: str
    sqnr_db: float  # model output SQNR with only this layer quantized

    def as_dict(self) -> dict[str, object]:
        return {"node": self.node, "module": self.module, "op": self.op, "sqnr_db": round(self.sqnr_db, 3)}


@dataclass(frozen=True)
class MixedPrecision:
    float_layers: tuple[str, ...]  # node names kept float (on top of the user's exclusions)
    sqnr_db: float  # output SQNR reached on the probe inputs
    all_quantized_sqnr_db: float
    target_sqnr_db: float | None
    ranking: tuple[LayerSensitivity, ...]


def exact(names: Sequence[str]) -> tuple[str, ...]:
    """Exclusion patterns matching exactly these node names."""
    return tuple(f"^{re.escape(n)}$" for n in names)


class Prober:
    """Builds quantized variants of one float graph through the target (its passes, its emitter in
    probe mode, its runner) and measures each on fixed inputs against the float model. Going through
    the target is what makes every target's mixed precision measure what it will ship (a .tflite in
    the LiteRT interpreter, the QNN graph with its host embedding)."""

    def __init__(self, graph: gs.Graph, fp32_path: Path | None, target, ranges: dict[str, TensorRange],
                 inputs: InputSet, base_exclude: Sequence[str], *, timestep_input: str | None, template: Manifest,
                 folder: Path, expected: np.ndarray | None = None):
        """`expected`: the float model's outputs on `inputs` when already known (a Ray worker's prober
        takes the driver's, so every probe is scored against the same reference); else `fp32_path` runs."""
        self.graph = graph
        self.target = target
        self.ranges = ranges
        self.inputs = inputs
        self.base_exclude = tuple(base_exclude)
        self.timestep_input = timestep_input
        self.template = template
        self.folder = Path(folder)
        self.probes = 0
        # Node names of the last probe's device graph: a layer a target moves off the device (QNN's time
        # embedding, computed on the host in float) gains nothing from being raised.
        self.device_nodes: frozenset[str] = frozenset()
        if expected is None:
            reference = OnnxRunner([fp32_path])
            expected = np.concatenate([reference.run(feed) for _, feed in inputs.batches(16)])
        self.expected = expected

    def sqnr(self, exclude: Sequence[str]) -> float:
        return sqnr_db(self.expected, self.outputs(exclude))

    def outputs(self, exclude: Sequence[str]) -> np.ndarray:
        """The probe graph's outputs on the inputs, with `exclude` taken out of the main precision."""
        graph = copy_graph(self.graph)
        plan = plan_quantization(graph, self.target.caps, (*self.base_exclude, *exclude))
        compiled = self.target.compile_bucket(graph, BucketJob(0, plan, self.ranges, self.timestep_input),
                                              PassContext())
        self.device_nodes = frozenset(n.name for n in compiled.graph.nodes)
        folder = self.folder / f"probe{self.probes}"
        self.probes += 1
        emitted = self.target.emit([compiled], folder, EmitPurpose.PROBE)
        manifest = replace(self.template, buckets=(BucketRecord(0, (0.0, self.template.model.timestep_scale), (),
                                                                emitted.bucket_files[0]),), device=emitted.device)
        try:
            runner = self.target.runner(folder, manifest)
            got = np.concatenate([runner.run(feed) for _, feed in self.inputs.batches(16)])
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return got


# Each candidate layer's output SQNR with only that layer quantized, in the candidates' order.
ProbeMap = Callable[[Prober, Sequence[str]], Sequence[float]]


def probe_each(prober: Prober, candidates: Sequence[str]) -> list[float]:
    """The built-in ProbeMap: one probe after the other on this machine (sensitivity_ray.py: on Ray)."""
    return [prober.sqnr(alone(candidates, name)) for name in tqdm(candidates, desc="sensitivity", unit="layer",
                                                                   leave=False)]


def alone(candidates: Sequence[str], name: str) -> tuple[str, ...]:
    """Exclusions that leave `name` the only candidate quantized."""
    return exact([c for c in candidates if c != name])


def rank_layers(prober: Prober, candidates: Sequence[str], nodes: dict,
                probe_map: ProbeMap = probe_each) -> list[LayerSensitivity]:
    """Each candidate quantized alone; most sensitive (lowest SQNR) first."""
    scores = probe_map(prober, candidates)
    out = [LayerSensitivity(name, module_path(nodes[name]), nodes[name].op, float(score))
           for name, score in zip(candidates, scores, strict=True)]
    return sorted(out, key=lambda s: s.sqnr_db)


def choose_float_layers(ranking: Sequence[LayerSensitivity], evaluate: Callable[[Sequence[str]], float], *,
                        target_sqnr_db: float | None, max_float: int) -> tuple[tuple[str, ...], float]:
    """Fewest most-sensitive layers to keep float so that evaluate(float_layers) >= target (bisection);
    without a target, the `max_float` most sensitive ones."""
    names = [s.node for s in ranking]
    if target_sqnr_db is None:
        chosen = tuple(names[:max_float])
        return chosen, evaluate(chosen)
    lo, hi = 0, min(max_float, len(names))
    best = (tuple(names[:hi]), evaluate(names[:hi]))
    if best[1] < target_sqnr_db:
        return best  # the budget cannot reach the target; report what it reaches
    while lo < hi:
        mid = (lo + hi) // 2
        score = evaluate(names[:mid])
        if score >= target_sqnr_db:
            hi, best = mid, (tuple(names[:mid]), score)
        else:
            lo = mid + 1
    return best


def mixed_precision(graph: gs.Graph, fp32_path: Path, target, ranges: dict[str, TensorRange], inputs: InputSet,
                    base_exclude: Sequence[str], *, timestep_input: str | None, template: Manifest, folder: Path,
                    target_sqnr_db: float | None, max_float: int, probe_map: ProbeMap = probe_each) -> MixedPrecision:
    """`graph` is the canonical float graph (copied, never changed); `template` the manifest of the build
    so far, from which each probe's runner reads the model's inputs; probes are built in `folder` (removed
    afterwards). `probe_map` runs the per-layer probes of the ranking (on Ray: sensitivity_ray.py); the
    few probes of the bisection run here, one after the other."""
    plan = plan_quantization(graph, target.caps, base_exclude)
    candidates = [w.node for w in plan.weights if w.node not in set(plan.excluded)]
    Path(folder).mkdir(parents=True, exist_ok=True)
    try:
        prober = Prober(graph, fp32_path, target, ranges, inputs, base_exclude, timestep_input=timestep_input,
                        template=template, folder=Path(folder))
        ranking = rank_layers(prober, candidates, {n.name: n for n in graph.nodes}, probe_map)
        all_q = prober.sqnr(())
        layers, reached = choose_float_layers(ranking, lambda names: prober.sqnr(exact(names)),
                                              target_sqnr_db=target_sqnr_db, max_float=max_float)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return MixedPrecision(layers, reached, all_q, target_sqnr_db, tuple(ranking))
