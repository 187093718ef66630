"""Layer sensitivity and mixed precision: which weighted layers cost the most fidelity when quantized,
and the fewest to keep in float to reach a requested output SQNR.

Sensitivity is measured directly, not estimated: for each candidate layer a graph with only that
layer quantized runs on recorded inputs spread over the timesteps, and its output SQNR against the
float model is the layer's score (low = sensitive). Mixed precision then keeps the most sensitive
layers in float, the count found by bisection over the sensitivity order (each probe is a full
quantized graph, so interactions between layers are measured, not assumed away).
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from qcompile.calibration.inputs import InputSet
from qcompile.evaluation.metrics import sqnr_db
from qcompile.graph_io import load_graph, module_path
from qcompile.pass_manager import PassContext, PassManager
from qcompile.passes.insert_qdq import plan_quantization
from qcompile.quant import TensorRange
from qcompile.runtime import OnnxRunner


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
    """Builds and runs quantized variants of one float graph on fixed inputs."""

    def __init__(self, fp32_path: Path, target, ranges: dict[str, TensorRange], inputs: InputSet,
                 base_exclude: Sequence[str]):
        self.fp32_path = fp32_path
        self.target = target
        self.ranges = ranges
        self.inputs = inputs
        self.base_exclude = tuple(base_exclude)
        reference = OnnxRunner([fp32_path])
        self.expected = np.concatenate([reference.run(feed) for _, feed in inputs.batches(16)])
        self.tmp = Path(tempfile.mkdtemp(prefix="qcompile-sensitivity-"))

    def sqnr(self, exclude: Sequence[str]) -> float:
        graph = load_graph(self.fp32_path)
        plan = plan_quantization(graph, self.target.caps, (*self.base_exclude, *exclude))
        PassManager(self.target.pipeline(plan, self.ranges)).run(graph, PassContext())
        files = self.target.emit([graph], self.tmp)[0]
        runner = OnnxRunner([self.tmp / files[0]])
        got = np.concatenate([runner.run(feed) for _, feed in self.inputs.batches(16)])
        return sqnr_db(self.expected, got)


def rank_layers(prober: Prober, candidates: Sequence[str], nodes: dict) -> list[LayerSensitivity]:
    """Each candidate quantized alone; most sensitive (lowest SQNR) first."""
    out = []
    for name in tqdm(candidates, desc="sensitivity", unit="layer", leave=False):
        others = [c for c in candidates if c != name]
        node = nodes[name]
        out.append(LayerSensitivity(name, module_path(node), node.op, prober.sqnr(exact(others))))
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


def mixed_precision(fp32_path: Path, target, ranges: dict[str, TensorRange], inputs: InputSet,
                    base_exclude: Sequence[str], *, target_sqnr_db: float | None, max_float: int) -> MixedPrecision:
    graph = load_graph(fp32_path)
    plan = plan_quantization(graph, target.caps, base_exclude)
    candidates = [w.node for w in plan.weights]
    prober = Prober(fp32_path, target, ranges, inputs, base_exclude)
    ranking = rank_layers(prober, candidates, {n.name: n for n in graph.nodes})
    all_q = prober.sqnr(())
    layers, reached = choose_float_layers(ranking, lambda names: prober.sqnr(exact(names)),
                                          target_sqnr_db=target_sqnr_db, max_float=max_float)
    return MixedPrecision(layers, reached, all_q, target_sqnr_db, tuple(ranking))
