"""SmoothQuant in a build: scales from the cached statistics, a smoothed copy of the float model, and
statistics collected again on that copy.

The cache already holds what the smoothing factors need: the per-input-channel absmax of every
MatMul/Gemm input (its channel axis is the last one), per timestep. One factor per channel serves every
timestep bucket, because the buckets share one set of weights, so the absmax is taken over all
timesteps. Smoothing changes the activations it divides (and, folded into a preceding linear or
LayerNorm, that op's output), so their cached ranges are stale: the recording is replayed through the
smoothed model once more, for the tensors the plan quantizes. That second pass is not cached: it
depends on alpha, and it costs one replay (about as long as the first statistics pass).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from qcompile.calibration.recorder import Recording
from qcompile.calibration.stats import StatsTable, collect_stats
from qcompile.graph_io import load_graph, save_graph
from qcompile.pass_manager import PassContext, PassManager
from qcompile.passes.cleanup import NameNodes
from qcompile.passes.smoothquant import SmoothGroup, SmoothQuant

SMOOTHED_FILE = "smoothed.onnx"


@dataclass(frozen=True)
class Smoothed:
    path: Path  # the smoothed float model (same function, weights rescaled)
    table: StatsTable  # statistics of its activations
    groups: tuple[SmoothGroup, ...]
    seconds: float

    def summary(self) -> dict[str, object]:
        folds: dict[str, int] = {}
        for g in self.groups:
            folds[g.fold.value] = folds.get(g.fold.value, 0) + 1
        return {"alpha": self.groups[0].alpha if self.groups else None, "groups": len(self.groups),
                "layers": sum(len(g.nodes) for g in self.groups), "folded_into": folds,
                "restats_seconds": round(self.seconds, 3)}


def smooth(fp32_path: Path, quantized_nodes: Sequence[str], table: StatsTable, recording: Recording, alpha: float,
           work_dir: Path, activations_of) -> Smoothed:
    """Smooth the quantized MatMul/Gemm layers named in `quantized_nodes` with `alpha`.

    `activations_of(graph)` names the tensors whose statistics the build needs on the smoothed graph
    (the quantization plan's activations)."""
    t0 = time.perf_counter()
    graph = load_graph(fp32_path)
    wanted = set(quantized_nodes)
    alphas, absmax = {}, {}
    for node in graph.nodes:
        if node.op not in ("MatMul", "Gemm") or node.name not in wanted:
            continue
        stats = table.tensors.get(node.inputs[0].name)
        rank = len(node.inputs[0].shape or ())
        if stats is None or rank == 0 or stats.channel_axis % rank != rank - 1:
            continue  # no per-input-channel statistic (an input also read per channel by a Conv)
        alphas[node.name] = alpha
        absmax[node.inputs[0].name] = stats.chan_absmax.max(axis=0)
    sq = SmoothQuant(absmax, alphas)
    PassManager([NameNodes(), sq]).run(graph, PassContext())
    path = save_graph(graph, Path(work_dir) / SMOOTHED_FILE)
    smoothed = load_graph(path)
    new_table = collect_stats(path, smoothed, recording, names=activations_of(smoothed))
    return Smoothed(path, new_table, sq.groups, time.perf_counter() - t0)
