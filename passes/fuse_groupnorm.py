"""GroupNorm as one unit: fused into `GroupNormalization` where the opset has the per-channel form,
else recorded as an annotated group of the nodes the exporters emit.

Both torch exporters (opset 18-20) lower `nn.GroupNorm` to
    Reshape(x, [0, G, -1]) -> InstanceNormalization(scale=1, bias=0) -> Reshape(., Shape(x))
        -> Mul(gamma[C,1,1]) -> Add(beta[C,1,1])
Why not always fuse: `GroupNormalization` exists from opset 18, but opset 18's scale and bias are
per *group* (deprecated in 21, which made them per channel, as torch has them). A per-channel gamma
cannot be expressed in the opset-18 form without keeping the Mul/Add, so below opset 21 the nodes
stay and each gets node metadata `qcompile.fused` = "groupnorm:<n>" plus `qcompile.fused_role`
(`reshape_in`, `instance_norm`, `shape`, `reshape_out`, `gamma`, `beta`); a target lowers the unit as
it likes (and Q/DQ insertion can leave its inside alone). From opset 21 the unit becomes one
`GroupNormalization` node (onnxruntime 1.31 CPU runs it; the fused tiny SD UNet matches to 1.2e-6).
`DecomposeGroupNorm` is the inverse for targets without the operator: it emits the exporter's form,
annotated, for either opset's semantics.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from qcompile.graph_io import constant_values, tag_new_node
from qcompile.pass_manager import GraphProperty, Pass, PassContext, PassResult
from qcompile.passes.fuse_attention import clear_stale, mark_unit

KIND = "groupnorm"
PER_CHANNEL_OPSET = 21  # GroupNormalization-21: scale and bias of shape [C]
FIRST_OPSET = 18  # GroupNormalization-18: scale and bias of shape [G]


class GroupNormForm(enum.Enum):
    AUTO = "auto"  # one GroupNormalization node at opset >= 21, annotated nodes below
    ANNOTATED = "annotated"  # always keep the exporter's nodes, annotated


@dataclass(frozen=True)
class GroupNormUnit:
    """One decomposed GroupNorm; node names by role ('' where the graph has none)."""

    index: int
    reshape_in: str
    instance_norm: str
    reshape_out: str
    shape: str  # the Shape(x) node feeding reshape_out, when only it reads that shape
    gamma: str  # the Mul by a per-channel constant
    beta: str  # the Add of a per-channel constant
    input: str
    output: str
    num_groups: int
    channels: int
    epsilon: float

    @property
    def unit_id(self) -> str:
        return f"{KIND}:{self.index}"

    def roles(self) -> tuple[tuple[str, str], ...]:
        pairs = (("reshape_in", self.reshape_in), ("instance_norm", self.instance_norm), ("shape", self.shape),
                 ("reshape_out", self.reshape_out), ("gamma", self.gamma), ("beta", self.beta))
        return tuple((name, role) for role, name in pairs if name)


def find_groupnorm(graph: gs.Graph) -> list[GroupNormUnit]:
    """Every decomposed GroupNorm, in graph order."""
    outs = {t.name for t in graph.outputs}
    units: list[GroupNormUnit] = []
    for node in graph.nodes:
        if node.op == "InstanceNormalization":
            unit = _match(node, len(units), outs)
            if unit is not None:
                units.append(unit)
    return units


class FuseGroupNorm(Pass):
    name = "fuse-groupnorm"
    requires = frozenset({GraphProperty.NODES_NAMED, GraphProperty.SHAPES_KNOWN})
    preserves = frozenset({GraphProperty.NODES_NAMED, GraphProperty.SHAPES_KNOWN, GraphProperty.QDQ_PAIRED})

    def __init__(self, form: GroupNormForm = GroupNormForm.AUTO):
        self.form = form

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        units = find_groupnorm(graph)
        if self.form is GroupNormForm.AUTO and graph.opset >= PER_CHANNEL_OPSET:
            nodes = {n.name: n for n in graph.nodes}
            for unit in units:
                self._fuse(graph, unit, nodes)
            if units:
                graph.cleanup(remove_unused_graph_inputs=False).toposort()
            cleared = clear_stale(graph, KIND, set())
            return PassResult(modified=bool(units) or cleared, detail=f"{len(units)} fused into GroupNormalization")
        changed = annotate_groupnorm(graph, units)
        return PassResult(modified=changed, detail=f"{len(units)} annotated (opset {graph.opset})")

    def _fuse(self, graph: gs.Graph, unit: GroupNormUnit, nodes: dict[str, gs.Node]) -> None:
        last = nodes[unit.beta or unit.gamma or unit.reshape_out]
        x, y = nodes[unit.reshape_in].inputs[0], last.outputs[0]
        rank = len(x.shape)
        gamma = _affine(nodes.get(unit.gamma), unit.channels, rank, 1.0)
        beta = _affine(nodes.get(unit.beta), unit.channels, rank, 0.0)
        node = gs.Node("GroupNormalization", last.name,
                       {"num_groups": unit.num_groups, "epsilon": unit.epsilon},
                       [x, gs.Constant(f"{last.name}_scale", gamma), gs.Constant(f"{last.name}_bias", beta)], [y])
        last.outputs.clear()  # frees the name and the output; cleanup drops the old nodes
        graph.nodes.append(tag_new_node(node, self.name, like=last))


class DecomposeGroupNorm(Pass):
    """GroupNormalization -> the exporter's Reshape/InstanceNormalization/Reshape/Mul/Add, annotated."""

    name = "decompose-groupnorm"
    requires = frozenset({GraphProperty.NODES_NAMED, GraphProperty.SHAPES_KNOWN})
    preserves = frozenset({GraphProperty.NODES_NAMED, GraphProperty.SHAPES_KNOWN, GraphProperty.QDQ_PAIRED})

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        count = 0
        for node in list(graph.nodes):
            if node.op == "GroupNormalization" and node.domain in (None, "", "ai.onnx"):
                count += self._decompose(graph, node)
        if count:
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        annotated = annotate_groupnorm(graph, find_groupnorm(graph))
        return PassResult(modified=bool(count) or annotated, detail=f"{count} decomposed")

    def _decompose(self, graph: gs.Graph, node: gs.Node) -> int:
        x, y = node.inputs[0], node.outputs[0]
        scale, bias = constant_values(node.inputs[1]), constant_values(node.inputs[2])
        groups = int(node.attrs["num_groups"])
        shape = x.shape
        if scale is None or bias is None or shape is None or not isinstance(shape[1], int):
            return 0  # run-time affine or unknown channel count: leave the operator
        channels, rank = shape[1], len(shape)
        if channels % groups or scale.size != bias.size:
            return 0
        if graph.opset < PER_CHANNEL_OPSET and scale.size == groups:  # per-group affine (opset 18)
            scale, bias = np.repeat(scale, channels // groups), np.repeat(bias, channels // groups)
        if scale.size != channels:
            return 0
        base, eps = node.name, float(node.attrs.get("epsilon", 1e-5))
        spatial = list(shape[2:])
        group_size = (int(np.prod(spatial)) * (channels // groups) if all(isinstance(d, int) for d in spatial)
                      else f"{base}_group_size")
        grouped = gs.Variable(f"{base}_grouped", x.dtype, [shape[0], groups, group_size])
        normed = gs.Variable(f"{base}_normed", x.dtype, [shape[0], groups, group_size])
        x_shape = gs.Variable(f"{base}_input_shape", np.int64, [rank])
        restored = gs.Variable(f"{base}_restored", x.dtype, shape)
        scaled = gs.Variable(f"{base}_scaled", x.dtype, shape)
        affine_shape = (channels,) + (1,) * (rank - 2)
        gamma = gs.Constant(f"{base}_gamma_values", scale.astype(np.float32).reshape(affine_shape))
        beta = gs.Constant(f"{base}_beta_values", bias.astype(np.float32).reshape(affine_shape))
        ones, zeros = np.ones(groups, np.float32), np.zeros(groups, np.float32)
        new = [
            gs.Node("Reshape", f"{base}_reshape_in", {},
                    [x, gs.Constant(f"{base}_group_shape", np.array([0, groups, -1], np.int64))], [grouped]),
            gs.Node("InstanceNormalization", f"{base}_instance_norm", {"epsilon": eps},
                    [grouped, gs.Constant(f"{base}_ones", ones), gs.Constant(f"{base}_zeros", zeros)], [normed]),
            gs.Node("Shape", f"{base}_shape", {}, [x], [x_shape]),
            gs.Node("Reshape", f"{base}_reshape_out", {}, [normed, x_shape], [restored]),
            gs.Node("Mul", f"{base}_gamma", {}, [restored, gamma], [scaled]),
            gs.Node("Add", base, {}, [scaled, beta], [y]),
        ]
        node.outputs.clear()
        node.name = f"{base}_decomposed"
        graph.nodes.extend(tag_new_node(n, self.name, like=node) for n in new)
        return 1


def annotate_groupnorm(graph: gs.Graph, units: list[GroupNormUnit]) -> bool:
    """Mark each unit's nodes (renumbering all of them in graph order); True when metadata changed."""
    nodes = {n.name: n for n in graph.nodes}
    changed = False
    for unit in units:
        changed |= mark_unit(((nodes[n], role) for n, role in unit.roles()), unit.unit_id)
    return clear_stale(graph, KIND, {n for u in units for n, _ in u.roles()}) or changed


# --- matching ------------------------------------------------------------------------------------
def _only_consumer(t: gs.Tensor, outs: set[str]) -> gs.Node | None:
    consumers = {id(c): c for c in t.outputs}
    if len(consumers) != 1 or t.name in outs:
        return None
    return next(iter(consumers.values()))


def _per_channel(t: gs.Tensor, channels: int, rank: int) -> np.ndarray | None:
    """The constant's values as [C] when it broadcasts along the channel axis only, else None."""
    values = constant_values(t)
    if values is None or values.ndim > rank:
        return None
    padded = values.reshape((1,) * (rank - values.ndim) + values.shape)
    if any(d != 1 for i, d in enumerate(padded.shape) if i != 1) or padded.shape[1] not in (1, channels):
        return None
    return np.broadcast_to(padded.reshape(-1), (channels,)).astype(np.float32)


def _affine(node: gs.Node | None, channels: int, rank: int, default: float) -> np.ndarray:
    if node is None:
        return np.full(channels, default, np.float32)
    for t in node.inputs:
        values = _per_channel(t, channels, rank)
        if values is not None:
            return values
    raise AssertionError(f"{node.name}: matched as per-channel affine but has no per-channel constant")


def _restores_shape(reshape: gs.Node, x: gs.Tensor, outs: set[str]) -> str | None:
    """'' or the Shape node's name when `reshape` gives back x's shape; None when it does not."""
    target = reshape.inputs[1]
    producer = target.inputs[0] if len(target.inputs) == 1 else None
    if producer is not None and producer.op == "Shape" and producer.inputs[0] is x:
        if producer.attrs.get("start", 0) == 0 and producer.attrs.get("end") in (None, len(x.shape or ())):
            return producer.name if _only_consumer(target, outs) is reshape else ""
        return None
    values = constant_values(target)
    shape = x.shape
    if values is None or shape is None or len(values) != len(shape):
        return None
    known = [v == d or (i == 0 and v == 0) for i, (v, d) in enumerate(zip(values.tolist(), shape, strict=True))]
    return "" if all(known) else None


def _match(inorm: gs.Node, index: int, outs: set[str]) -> GroupNormUnit | None:
    grouped = inorm.inputs[0]
    reshape_in = grouped.inputs[0] if len(grouped.inputs) == 1 else None
    if reshape_in is None or reshape_in.op != "Reshape" or _only_consumer(grouped, outs) is not inorm:
        return None
    x = reshape_in.inputs[0]
    group_shape = constant_values(reshape_in.inputs[1])
    if x.shape is None or len(x.shape) < 3 or not isinstance(x.shape[1], int) or group_shape is None:
        return None
    channels, rank = x.shape[1], len(x.shape)
    if group_shape.shape != (3,) or group_shape[2] != -1 or group_shape[0] not in (0, x.shape[0]):
        return None
    groups = int(group_shape[1])
    if groups <= 0 or channels % groups or reshape_in.attrs.get("allowzero", 0):
        return None
    ones, zeros = constant_values(inorm.inputs[1]), constant_values(inorm.inputs[2])
    if ones is None or zeros is None or not (np.all(ones == 1) and np.all(zeros == 0)):
        return None
    reshape_out = _only_consumer(inorm.outputs[0], outs)
    if reshape_out is None or reshape_out.op != "Reshape" or reshape_out.inputs[0] is not inorm.outputs[0]:
        return None
    shape_node = _restores_shape(reshape_out, x, outs)
    if shape_node is None:
        return None
    # Optional per-channel affine (absent for affine=False and for AdaGroupNorm's run-time scale).
    tail, gamma, beta = reshape_out.outputs[0], "", ""
    nxt = _only_consumer(tail, outs)
    if nxt is not None and nxt.op == "Mul" and any(_per_channel(t, channels, rank) is not None for t in nxt.inputs):
        gamma, tail = nxt.name, nxt.outputs[0]
        nxt = _only_consumer(tail, outs)
    if nxt is not None and nxt.op == "Add" and any(_per_channel(t, channels, rank) is not None for t in nxt.inputs):
        beta, tail = nxt.name, nxt.outputs[0]
    return GroupNormUnit(index, reshape_in.name, inorm.name, reshape_out.name, shape_node, gamma, beta,
                         x.name, tail.name, groups, channels, float(inorm.attrs.get("epsilon", 1e-5)))
