"""SmoothQuant (Xiao et al., 2023): move activation outliers into the weights of MatMul/Gemm layers.

A few input channels of a transformer's linear layers carry values 10-100x the rest, so one
per-tensor activation scale wastes most of the int8 grid on them. For X·W with X [.., K] and W [K, N],
    s_j = max|X_j|^alpha / max|W_j|^(1-alpha),   X·W = (X / s)·(s W)
leaves the float result unchanged and evens out both ranges (alpha=0.5 splits the difficulty).
`s W` scales the weight's input-channel rows (done here, offline). `X / s` must happen upstream, and
is folded where that costs nothing: into a LayerNormalization's scale and bias, or into the output
columns (and bias) of a preceding MatMul/Gemm; otherwise a `Mul(1/s)` node is inserted. Folding
changes X for every reader, so it is done only when every reader of X is smoothed with the same s:
layers sharing X (Q/K/V projections) share one s, computed from the max of their weight absmax.

Scales come from the original weights, for all groups at once, so the result does not depend on the
order groups are applied in. Calibration statistics of a smoothed activation are stale afterwards:
divide them by the group's `scale` (`SmoothGroup.activation` keeps its name when folded; an inserted
Mul's output is `<activation>_smoothed`), or calibrate again.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from qcompile.graph_io import constant_values, tag_new_node
from qcompile.pass_manager import GraphProperty, Pass, PassContext, PassResult
from qcompile.rewrite import consumers, producer, weight_axis

PASS_NAME = "smoothquant"
# s is clipped to this range: a dead channel (absmax 0) or a zero weight row would make it 0 or inf.
MIN_SCALE, MAX_SCALE = 1e-5, 1e5


class FoldTarget(enum.Enum):
    LAYER_NORM = "layernorm"  # LayerNormalization scale and bias / s
    LINEAR = "linear"  # preceding MatMul/Gemm output columns (and bias Add) / s
    MUL = "mul"  # a new Mul(1/s) in front of the smoothed layers


@dataclass(frozen=True, eq=False)
class SmoothGroup:
    activation: str  # X, read by every node in `nodes`
    nodes: tuple[str, ...]  # MatMul/Gemm nodes smoothed together
    scale: np.ndarray  # s [K]: X is divided by it, the weights' input rows multiplied
    alpha: float
    fold: FoldTarget


def plan_smoothquant(graph: gs.Graph, act_absmax: Mapping[str, np.ndarray],
                     alpha: float | Mapping[str, float]) -> tuple[SmoothGroup, ...]:
    """The smoothing groups and their scales; reads weights, changes nothing.

    `act_absmax`: per-input-channel max |X| keyed by activation tensor name. `alpha`: one value, or
    node name -> alpha (nodes not named are left alone; a group's alpha is the mean of its nodes').
    """
    members: dict[str, list[tuple[gs.Node, float]]] = {}
    for node in graph.nodes:
        if node.op not in ("MatMul", "Gemm") or node.inputs[0].name not in act_absmax or _input_axis(node) is None:
            continue
        a = alpha.get(node.name) if isinstance(alpha, Mapping) else alpha
        if a is not None:
            members.setdefault(node.inputs[0].name, []).append((node, float(a)))
    tensors = graph.tensors()
    outs = {t.name for t in graph.outputs}
    groups = []
    for name, group in members.items():
        act = np.abs(np.asarray(act_absmax[name], np.float64)).reshape(-1)
        w_max = np.zeros_like(act)
        for node, _ in group:
            w = np.abs(np.asarray(constant_values(node.inputs[1]), np.float64))
            rows = w.max(axis=1 - _input_axis(node))  # per input channel, over the outputs
            if rows.shape != act.shape:
                raise ValueError(f"smoothquant: {node.name} has {rows.size} input channels but the absmax of "
                                 f"'{name}' has {act.size}")
            w_max = np.maximum(w_max, rows)
        a = float(np.mean([a for _, a in group]))
        live = (act > 0) & (w_max > 0)
        s = np.where(live, np.power(act, a) / np.power(np.where(live, w_max, 1.0), 1.0 - a), 1.0)
        s = np.clip(s, MIN_SCALE, MAX_SCALE).astype(np.float32)
        groups.append(SmoothGroup(name, tuple(n.name for n, _ in group), s, a,
                                  _fold_target(tensors[name], {n.name for n, _ in group}, outs, s.size)))
    return tuple(groups)


class SmoothQuant(Pass):
    name = PASS_NAME
    requires = frozenset({GraphProperty.NODES_NAMED})
    preserves = frozenset({GraphProperty.NODES_NAMED, GraphProperty.SHAPES_KNOWN, GraphProperty.QDQ_PAIRED})

    def __init__(self, act_absmax: Mapping[str, np.ndarray], alpha: float | Mapping[str, float] = 0.5):
        self.act_absmax = act_absmax
        self.alpha = alpha
        self.groups: tuple[SmoothGroup, ...] = ()  # what the last run applied

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        self.groups = plan_smoothquant(graph, self.act_absmax, self.alpha)
        nodes = {n.name: n for n in graph.nodes}
        tensors = graph.tensors()
        taken = set(nodes) | set(tensors)  # names of new nodes and tensors must not clash with these
        for group in self.groups:
            x = tensors[group.activation]
            for node_name in group.nodes:
                node = nodes[node_name]
                _scale_slot(node, 1, _input_axis(node), group.scale, taken)
            if group.fold is FoldTarget.LAYER_NORM:
                _fold_layernorm(x.inputs[0], group.scale, taken)
            elif group.fold is FoldTarget.LINEAR:
                _fold_linear(x.inputs[0], group.scale, taken)
            else:
                self._insert_mul(graph, x, [nodes[n] for n in group.nodes], group.scale, taken)
        if any(g.fold is FoldTarget.MUL for g in self.groups):
            graph.toposort()
        counts = {f: sum(g.fold is f for g in self.groups) for f in FoldTarget}
        detail = f"{len(self.groups)} groups, {sum(len(g.nodes) for g in self.groups)} layers; " + ", ".join(
            f"{n} {f.value}" for f, n in counts.items())
        return PassResult(modified=bool(self.groups), detail=detail)

    def _insert_mul(self, graph: gs.Graph, x: gs.Tensor, readers: list[gs.Node], s: np.ndarray,
                    taken: set[str]) -> None:
        out = gs.Variable(_fresh(f"{x.name}_smoothed", taken), x.dtype, x.shape)
        inverse = gs.Constant(_fresh(f"{x.name}_inverse_smooth_scale", taken), (1.0 / s).astype(np.float32))
        mul = gs.Node("Mul", _fresh(f"{x.name}_smooth", taken), {}, [x, inverse], [out])
        graph.nodes.append(tag_new_node(mul, PASS_NAME, like=readers[0]))
        for reader in readers:
            reader.inputs[0] = out


def _fresh(name: str, taken: set[str]) -> str:
    while name in taken:
        name += "_"
    taken.add(name)
    return name


def _output_axis(node: gs.Node) -> int | None:
    """Output-channel axis of a constant 2-D weight of MatMul/Gemm reading an activation (where an
    upstream fold divides), else None."""
    if node.op not in ("MatMul", "Gemm") or len(node.inputs) < 2 or constant_values(node.inputs[0]) is not None:
        return None
    if node.op == "Gemm" and node.attrs.get("transA", 0):
        return None
    w = constant_values(node.inputs[1])
    return weight_axis(node, 2) if w is not None and w.ndim == 2 else None


def _input_axis(node: gs.Node) -> int | None:
    """Input-channel axis of the same weight (the rows SmoothQuant scales), else None."""
    axis = _output_axis(node)
    return None if axis is None else 1 - axis


def _per_channel_const(t: gs.Tensor, size: int) -> bool:
    values = constant_values(t)
    return values is not None and values.shape[-1:] == (size,) and values.size == size


def _fold_target(x: gs.Tensor, group: set[str], outs: set[str], size: int) -> FoldTarget:
    readers = {c.name for c in x.outputs}
    writer = producer(x)
    if writer is None or readers != group or x.name in outs:
        return FoldTarget.MUL
    if writer.op == "LayerNormalization":
        rank = len(writer.inputs[0].shape or ())
        axis = writer.attrs.get("axis", -1)
        if (axis == -1 or axis == rank - 1) and _per_channel_const(writer.inputs[1], size) and (
                len(writer.inputs) < 3 or _per_channel_const(writer.inputs[2], size)):
            return FoldTarget.LAYER_NORM
    if writer.op == "Gemm" and _output_axis(writer) is not None and (
            len(writer.inputs) < 3 or _per_channel_const(writer.inputs[2], size)):
        return FoldTarget.LINEAR
    if writer.op == "MatMul" and _output_axis(writer) is not None:
        return FoldTarget.LINEAR
    if writer.op == "Add":
        for data, bias in (writer.inputs, writer.inputs[::-1]):
            mm = producer(data)
            if (mm is not None and mm.op == "MatMul" and _output_axis(mm) is not None and len(data.outputs) == 1
                    and data.name not in outs and _per_channel_const(bias, size)):
                return FoldTarget.LINEAR
    return FoldTarget.MUL


def _scale_slot(node: gs.Node, index: int, axis: int, factor: np.ndarray, taken: set[str]) -> None:
    """Multiply input `index` of `node` by `factor` along `axis` (1-D constants: the last axis)."""
    t = node.inputs[index]
    values = np.asarray(constant_values(t))
    shape = [1] * values.ndim
    shape[axis] = -1
    new = (values * factor.reshape(shape)).astype(values.dtype)
    # Always a new Constant: assigning `.values` to a loaded one would keep its EXTERNAL data_location
    # and the saved model would point at bytes that were never written. The name is kept unless the
    # old tensor has other readers, which must go on reading the old values.
    alone = isinstance(t, gs.Constant) and len(consumers(t)) == 1
    node.inputs[index] = gs.Constant(t.name if alone else _fresh(f"{t.name}_{node.name}_smoothed", taken), new)


def _fold_layernorm(ln: gs.Node, s: np.ndarray, taken: set[str]) -> None:
    for i in range(1, len(ln.inputs)):
        _scale_slot(ln, i, -1, 1.0 / s, taken)


def _fold_linear(producer: gs.Node, s: np.ndarray, taken: set[str]) -> None:
    inv = 1.0 / s
    if producer.op == "Add":
        data, bias_index = next((producer.inputs[i], 1 - i) for i in (0, 1)
                                if _per_channel_const(producer.inputs[1 - i], s.size))
        _scale_slot(producer, bias_index, -1, inv, taken)
        producer = data.inputs[0]
    _scale_slot(producer, 1, _output_axis(producer), inv, taken)
    if producer.op == "Gemm" and len(producer.inputs) > 2:
        _scale_slot(producer, 2, -1, inv, taken)
