"""Mixed precision per timestep bucket: each bucket's graph raises its own fewest layers to the wide
activation type (16 bits on an 8-bit NPU; float where the runtime has float kernels).

Why per bucket: the W8A8 error of a diffusion model is not spread evenly over t. On the reference
model it sits in the last steps (t <= 250) and in the few tensors whose range moves with t, and the
guidance signal (cond - uncond) is smallest at the first steps, where the CFG-gap ratio passes 1.
A build that already deploys one graph per bucket can give each bucket the precision it needs
instead of paying for the worst bucket everywhere. Weights are quantized the same way in every
bucket (8 bits, per channel), so buckets still share them.

Per bucket, on that bucket's own recorded rows (both CFG halves of the calls whose timestep falls in
it) and with its own calibrated ranges:
1. candidates: the layers of the blocks (module path to depth 3: `up_blocks.2.resnets`, `conv_in`)
   whose raising gains most in this bucket, one probe per block, at most `candidates` layers (a
   probe per layer over all ~130 layers of even the reference model costs minutes per bucket);
2. sensitivity: `sensitivity.rank_layers` measures each candidate quantized alone (the others wide)
   through the target's own passes and runner;
3. the fewest most-sensitive layers wide such that the bucket meets its targets: output SQNR on its
   rows, and the CFG-gap ratio (quantization error of cond - uncond over its float magnitude, worst
   timestep of the bucket); bisection over the ranking, every probe a whole quantized graph.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_graphsurgeon as gs

from qcompile.calibration.inputs import InputSet
from qcompile.calibration.recorder import CFG_COND, CFG_UNCOND, Recording
from qcompile.evaluation.metrics import relative_error, sqnr_db
from qcompile.graph_io import module_path
from qcompile.manifest import Manifest
from qcompile.passes.insert_qdq import plan_quantization
from qcompile.quant import TensorRange
from qcompile.sensitivity import LayerSensitivity, ProbeMap, Prober, exact, probe_each, rank_layers


@dataclass(frozen=True, eq=False)
class ProbeRows:
    """One bucket's probe rows; `pairs` holds (uncond row, cond row) index pairs when the recording
    has classifier-free guidance, with each pair's timestep."""

    inputs: InputSet
    pairs: np.ndarray  # (P, 2) int
    pair_timesteps: np.ndarray  # (P,)


@dataclass(frozen=True)
class Probe:
    sqnr_db: float
    cfg_gap_max: float | None  # worst timestep of the bucket; None without CFG pairs


@dataclass(frozen=True)
class BucketTargets:
    sqnr_db: float | None = None
    cfg_gap: float | None = None

    def met(self, probe: Probe) -> bool:
        ok = self.sqnr_db is None or probe.sqnr_db >= self.sqnr_db
        return ok and (self.cfg_gap is None or probe.cfg_gap_max is None or probe.cfg_gap_max <= self.cfg_gap)


@dataclass(frozen=True)
class BucketMixed:
    """What one bucket raised, and what its probe rows measured before and after."""

    bucket: int
    wide_layers: tuple[str, ...]
    reached: Probe
    all_quantized: Probe
    met: bool
    ranking: tuple[LayerSensitivity, ...]
    rows: int

    def as_dict(self) -> dict[str, object]:
        return {"layers": list(self.wide_layers), "probe_rows": self.rows, "target_met": self.met,
                "reached_sqnr_db": round(self.reached.sqnr_db, 3),
                "all_quantized_sqnr_db": round(self.all_quantized.sqnr_db, 3),
                "reached_cfg_gap_max": _round(self.reached.cfg_gap_max),
                "all_quantized_cfg_gap_max": _round(self.all_quantized.cfg_gap_max),
                "sensitivity_top10": [s.as_dict() for s in self.ranking[:10]]}


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


# --- probe rows -----------------------------------------------------------------------------------
def bucket_probe_rows(recording: Recording, timesteps: Sequence[float], rows: int) -> ProbeRows:
    """About `rows` recorded rows of the bucket's timesteps, spread evenly over them, CFG halves kept
    in pairs (the same sample's uncond and cond rows of one call)."""
    wanted = {float(t) for t in timesteps}
    quota = max(1, -(-rows // (2 * max(1, len(wanted)))))  # pairs per timestep
    taken: dict[float, int] = {}
    parts: list[dict[str, np.ndarray]] = []
    pairs, pair_ts, count, unbatched = [], [], 0, frozenset()
    for inputs, meta in recording.shards():
        unbatched = inputs.unbatched
        keep: list[int] = []
        for call in np.unique(meta.call):
            in_call = np.nonzero(meta.call == call)[0]
            t = float(meta.timestep[in_call[0]])
            left = quota - taken.get(t, 0)
            if t not in wanted or left <= 0:
                continue
            uncond = in_call[meta.cfg_half[in_call] == CFG_UNCOND]
            cond = in_call[meta.cfg_half[in_call] == CFG_COND]
            if len(uncond) and len(uncond) == len(cond):
                pick = np.unique(np.linspace(0, len(uncond) - 1, min(left, len(uncond))).round().astype(int))
                for j in pick:
                    pairs.append((count + len(keep), count + len(keep) + 1))
                    pair_ts.append(t)
                    keep += [int(uncond[j]), int(cond[j])]
                taken[t] = taken.get(t, 0) + len(pick)
            else:  # no guidance: plain rows
                pick = np.unique(np.linspace(0, len(in_call) - 1, min(2 * left, len(in_call))).round().astype(int))
                keep += [int(in_call[j]) for j in pick]
                taken[t] = taken.get(t, 0) + (len(pick) + 1) // 2
        if keep:
            idx = np.asarray(keep)
            parts.append({**inputs.take(idx), "_t": meta.timestep[idx]})
            count += len(keep)
    if not parts:
        raise ValueError(f"the recording holds no rows at timesteps {sorted(wanted)}")
    arrays = {k: (parts[0][k] if k in unbatched else np.concatenate([p[k] for p in parts])) for k in parts[0]}
    ts = arrays.pop("_t")
    return ProbeRows(InputSet(arrays, ts, unbatched), np.asarray(pairs, np.int64).reshape(-1, 2),
                     np.asarray(pair_ts, np.float32))


# --- candidates by block -------------------------------------------------------------------------------
def block_of(module: str, depth: int = 3) -> str:
    """The block a layer belongs to, by module path: `down_blocks.0.resnets`, `conv_in`."""
    return ".".join(module.split(".")[:depth])


def block_candidates(prober: BucketProber, layers: Sequence[str], nodes: dict, base: Probe,
                     limit: int) -> tuple[list[str], list[tuple[str, float]]]:
    """The layers of the blocks whose raising gains most in this bucket, measured: each block raised
    alone (the rest 8-bit) is one probe; blocks are taken by gain until `limit` layers are in. Returns
    the candidates and each block's measured gain (dB)."""
    blocks: dict[str, list[str]] = {}
    for name in layers:
        blocks.setdefault(block_of(module_path(nodes[name]) or name), []).append(name)
    if len(layers) <= limit:
        return list(layers), []
    gains = [(b, prober.measure(exact(members)).sqnr_db - base.sqnr_db) for b, members in blocks.items()]
    gains.sort(key=lambda g: -g[1])
    out: list[str] = []
    for b, _ in gains:
        if len(out) >= limit:
            break
        out += blocks[b][:limit - len(out)]
    return out, gains


# --- measuring one bucket -----------------------------------------------------------------------------
class BucketProber(Prober):
    """A Prober on one bucket's rows and ranges that also measures the CFG-gap ratio of its pairs."""

    def __init__(self, graph: gs.Graph, fp32_path: Path, target, ranges: dict[str, TensorRange], rows: ProbeRows,
                 base_exclude: Sequence[str], *, timestep_input: str | None, template: Manifest, folder: Path):
        super().__init__(graph, fp32_path, target, ranges, rows.inputs, base_exclude, timestep_input=timestep_input,
                         template=template, folder=folder)
        self.rows = rows

    def measure(self, exclude: Sequence[str]) -> Probe:
        got = self.outputs(exclude)
        return Probe(sqnr_db(self.expected, got), cfg_gap_max(self.expected, got, self.rows))


def cfg_gap_max(expected: np.ndarray, got: np.ndarray, rows: ProbeRows) -> float | None:
    """Per timestep, |error of (cond - uncond)| / |float (cond - uncond)| over that timestep's pairs
    (the evaluation's per-step CFG-gap ratio); the largest."""
    if not len(rows.pairs):
        return None
    worst = 0.0
    for t in np.unique(rows.pair_timesteps):
        p = rows.pairs[rows.pair_timesteps == t]
        ref = expected[p[:, 1]] - expected[p[:, 0]]
        test = got[p[:, 1]] - got[p[:, 0]]
        worst = max(worst, relative_error(ref, test))
    return worst


def choose_wide_layers(ranking: Sequence[str], measure, targets: BucketTargets,
                       max_wide: int) -> tuple[tuple[str, ...], Probe, bool]:
    """Fewest leading layers of `ranking` to raise so that `targets` are met (bisection); when the
    budget cannot meet them, the whole budget and what it reaches."""
    names = list(ranking)
    hi = min(max_wide, len(names))
    best = (tuple(names[:hi]), measure(names[:hi]))
    if not targets.met(best[1]):
        return best[0], best[1], False
    lo = 0
    while lo < hi:
        mid = (lo + hi) // 2
        probe = measure(names[:mid])
        if targets.met(probe):
            hi, best = mid, (tuple(names[:mid]), probe)
        else:
            lo = mid + 1
    return best[0], best[1], True


def bucket_mixed_precision(graph: gs.Graph, fp32_path: Path, target, ranges: dict[str, TensorRange],
                           rows: ProbeRows, base_exclude: Sequence[str], *, bucket: int, timestep_input: str | None,
                           template: Manifest, folder: Path, targets: BucketTargets, max_wide: int,
                           candidates: int, probe_map: ProbeMap = probe_each) -> BucketMixed:
    """`probe_map` runs the ranking's per-layer probes (one after the other, or as Ray tasks)."""
    caps = target.caps
    plan = plan_quantization(graph, caps, base_exclude)
    layers = [w.node for w in plan.weights if w.node not in set(plan.excluded)]
    nodes = {n.name: n for n in graph.nodes}
    Path(folder).mkdir(parents=True, exist_ok=True)
    try:
        prober = BucketProber(graph, fp32_path, target, ranges, rows, base_exclude, timestep_input=timestep_input,
                              template=template, folder=Path(folder))
        all_q = prober.measure(())
        if targets.met(all_q) and (targets.sqnr_db is not None or targets.cfg_gap is not None):
            return BucketMixed(bucket, (), all_q, all_q, True, (), rows.inputs.count)
        layers = [n for n in layers if n in prober.device_nodes]  # what runs on the host stays float
        chosen, _ = block_candidates(prober, layers, nodes, all_q, candidates)
        ranking = rank_layers(prober, chosen, nodes, probe_map)
        order = [s.node for s in ranking]
        if targets.sqnr_db is None and targets.cfg_gap is None:  # a budget alone: exactly that many
            wide = tuple(order[:max_wide])
            reached, met = prober.measure(exact(wide)), True
        else:
            wide, reached, met = choose_wide_layers(order, lambda names: prober.measure(exact(names)), targets,
                                                    max_wide)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return BucketMixed(bucket, wide, reached, all_q, met, tuple(ranking), rows.inputs.count)


# --- the cost figure ----------------------------------------------------------------------------------
def _numel(t: gs.Tensor) -> int:
    """Elements of a tensor from its inferred shape, symbolic dims as 1 (fractions do not depend on
    the batch); 0 when unknown."""
    if t.shape is None:
        return 0
    return int(np.prod([d if isinstance(d, int) and d > 0 else 1 for d in t.shape]))


def _dq_dtype(t: gs.Tensor) -> np.dtype | None:
    """The storage dtype of an activation read through DequantizeLinear (None: read as float)."""
    if len(t.inputs) != 1 or t.inputs[0].op != "DequantizeLinear":
        return None
    dq = t.inputs[0]
    zero = dq.inputs[2] if len(dq.inputs) > 2 else None
    if isinstance(zero, gs.Constant):
        return np.dtype(zero.values.dtype)
    return np.dtype(dq.inputs[0].dtype) if dq.inputs[0].dtype is not None else None


def _has_weight(node: gs.Node) -> bool:
    w = node.inputs[1] if len(node.inputs) > 1 else None
    if isinstance(w, gs.Constant):
        return True
    return w is not None and len(w.inputs) == 1 and w.inputs[0].op == "DequantizeLinear" \
        and isinstance(w.inputs[0].inputs[0], gs.Constant)


def _macs(node: gs.Node) -> int:
    out = _numel(node.outputs[0])
    if node.op == "Conv":
        w = node.inputs[1].shape
        return out * int(np.prod(w[1:])) if w is not None and all(isinstance(d, int) for d in w) else 0
    a = node.inputs[0].shape
    k = a[-1] if a is not None and isinstance(a[-1], int) else 0
    if node.op == "Gemm" and node.attrs.get("transA", 0) and a is not None:
        k = a[0] if isinstance(a[0], int) else 0
    return out * k


def wide_fractions(graph: gs.Graph, caps) -> dict[str, object]:
    """The cost of a bucket graph's precision, since the simulator's timing is not the phone's: the
    fraction of activation bytes stored wide and of the weighted ops' MACs computed wide.

    Integer-only targets: every activation is stored quantized; "wide" is the caps' wide dtype (16-bit
    graph outputs included). Targets with float kernels: the activation inputs of the layers with
    weights, float ones counted as wide (4 bytes), quantized ones at their width; activation x
    activation MatMuls, which such targets keep float by design, are left out of both fractions."""
    narrow = caps.activation_dtype.numpy  # a numpy dtype: float8's name differs from the QDtype's
    wide_name = caps.wide_dtype.value if caps.integer_only and caps.wide_dtype is not None else "float32"
    total_bytes = wide_bytes = 0
    if caps.integer_only:
        for node in graph.nodes:
            if node.op != "QuantizeLinear" or isinstance(node.inputs[0], gs.Constant):
                continue
            dtype = node.outputs[0].dtype
            size = np.dtype(dtype).itemsize if dtype is not None else 1
            n = _numel(node.outputs[0]) * size
            total_bytes += n
            wide_bytes += n if np.dtype(dtype) != narrow else 0
    total_macs = wide_macs = 0
    for node in graph.nodes:
        if node.op not in ("Conv", "Gemm", "MatMul"):
            continue
        if not caps.integer_only and not _has_weight(node):
            continue  # attention's activation x activation MatMuls: float by the target's design, not a choice
        macs = _macs(node)
        dtype = _dq_dtype(node.inputs[0])
        wide = dtype is None or dtype != narrow
        total_macs += macs
        wide_macs += macs if wide else 0
        if not caps.integer_only:
            n = _numel(node.inputs[0])
            total_bytes += n * (4 if dtype is None else dtype.itemsize)
            wide_bytes += n * 4 if dtype is None else 0
    return {"wide_dtype": wide_name,
            "wide_activation_bytes_fraction": round(wide_bytes / total_bytes, 5) if total_bytes else 0.0,
            "wide_mac_fraction": round(wide_macs / total_macs, 5) if total_macs else 0.0}
