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
it likes (TFLite lowers it as one normalization over NHWC storage, `targets/tflite/ops_norm.py`) and
Q/DQ insertion can leave its inside alone. From opset 21 the unit becomes one `GroupNormalization`
node (onnxruntime 1.31 CPU runs it; the fused tiny SD UNet matches to 1.2e-6).
`GroupNormPattern` is also what `groupnorm_affine_conv` rewrites from.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from qcompile.graph_io import constant_values
from qcompile.pass_manager import GraphProperty, Pass, PassContext, PassResult
from qcompile.rewrite import (
    Edit,
    GraphView,
    Pattern,
    Rule,
    apply,
    clear_stale,
    find,
    mark_unit,
    per_channel,
    producer,
    require,
)

KIND = "groupnorm"
PER_CHANNEL_OPSET = 21  # GroupNormalization-21: scale and bias of shape [C]


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


@dataclass(frozen=True)
class GroupNormMatch:
    """The nodes of one decomposed GroupNorm by role, and its attributes."""

    members: tuple[tuple[gs.Node, str], ...]  # in `GroupNormUnit.roles` order
    x: gs.Tensor
    num_groups: int
    channels: int
    epsilon: float
    gamma: np.ndarray  # [C], ones when the graph has no Mul
    beta: np.ndarray  # [C], zeros when the graph has no Add

    @property
    def nodes(self) -> tuple[gs.Node, ...]:
        return tuple(node for node, _ in self.members)

    def role(self, name: str) -> gs.Node | None:
        return next((node for node, role in self.members if role == name), None)

    @property
    def last(self) -> gs.Node:
        """The node writing the unit's result."""
        return self.members[-1][0]

    def unit(self, index: int) -> GroupNormUnit:
        names = {role: node.name for node, role in self.members}
        return GroupNormUnit(index, names["reshape_in"], names["instance_norm"], names["reshape_out"],
                             names.get("shape", ""), names.get("gamma", ""), names.get("beta", ""), self.x.name,
                             self.last.outputs[0].name, self.num_groups, self.channels, self.epsilon)


class GroupNormPattern(Pattern[GroupNormMatch]):
    """Reshape [N, G, -1] -> InstanceNormalization(1, 0) -> Reshape back [-> Mul gamma] [-> Add beta]."""

    name = "groupnorm"
    anchors = frozenset({"InstanceNormalization"})

    def match(self, anchor: gs.Node, view: GraphView) -> GroupNormMatch:
        return _match(anchor, view)


class GroupNormAsOperator(GroupNormPattern, Rule[GroupNormMatch]):
    """The unit as one GroupNormalization-21 node writing the unit's output tensor."""

    name = "fuse-groupnorm"

    def rewrite(self, match: GroupNormMatch, edit: Edit) -> None:
        last = match.last
        scale, bias = gs.Constant(f"{last.name}_scale", match.gamma), gs.Constant(f"{last.name}_bias", match.beta)
        edit.add("GroupNormalization", last.name, [match.x, scale, bias], [last.outputs[0]],
                 {"num_groups": match.num_groups, "epsilon": match.epsilon}, like=last)


def find_groupnorm(graph: gs.Graph) -> list[GroupNormUnit]:
    """Every decomposed GroupNorm, in graph order."""
    return [m.unit(i) for i, m in enumerate(find(graph, GroupNormPattern()).matches)]


class FuseGroupNorm(Pass):
    name = "fuse-groupnorm"
    requires = frozenset({GraphProperty.NODES_NAMED, GraphProperty.SHAPES_KNOWN})
    preserves = frozenset({GraphProperty.NODES_NAMED, GraphProperty.SHAPES_KNOWN, GraphProperty.QDQ_PAIRED})

    def __init__(self, form: GroupNormForm = GroupNormForm.AUTO):
        self.form = form

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        if self.form is GroupNormForm.AUTO and graph.opset >= PER_CHANNEL_OPSET:
            report = apply(graph, [GroupNormAsOperator()])
            cleared = clear_stale(graph, KIND, set())
            return PassResult(modified=bool(report.matches) or cleared,
                              detail=report.detail(f"{len(report.matches)} fused into GroupNormalization"))
        report = find(graph, GroupNormPattern())
        changed = False
        for index, match in enumerate(report.matches):
            changed |= mark_unit(match.members, match.unit(index).unit_id)
        changed |= clear_stale(graph, KIND, {n.name for m in report.matches for n in m.nodes})
        return PassResult(modified=changed,
                          detail=report.detail(f"{len(report.matches)} annotated (opset {graph.opset})"))


# --- matching ------------------------------------------------------------------------------------
def _affine(node: gs.Node | None, channels: int, rank: int) -> np.ndarray | None:
    """The per-channel constant operand of a Mul/Add, else None."""
    if node is None:
        return None
    return next((v for v in (per_channel(t, channels, rank) for t in node.inputs) if v is not None), None)


def _restores_shape(reshape: gs.Node, x: gs.Tensor, view: GraphView) -> gs.Node | None:
    """The Shape node that only `reshape` reads, when it gives back x's shape from Shape(x) or from a
    constant (None then); NoMatch when it does not restore x's shape."""
    target = reshape.inputs[1]
    shape_node = producer(target)
    if shape_node is not None and shape_node.op == "Shape" and shape_node.inputs[0] is x:
        require(shape_node.attrs.get("start", 0) == 0 and shape_node.attrs.get("end") in (None, len(x.shape)),
                "the second Reshape reads a part of x's shape")
        return shape_node if view.only_consumer(target) is reshape else None
    values = constant_values(target)
    require(values is not None and len(values) == len(x.shape) and
            all(v == d or (i == 0 and v == 0) for i, (v, d) in enumerate(zip(values.tolist(), x.shape, strict=True))),
            "the second Reshape does not restore x's shape")
    return None


def _match(inorm: gs.Node, view: GraphView) -> GroupNormMatch:
    grouped = inorm.inputs[0]
    reshape_in = producer(grouped)
    require(reshape_in is not None and reshape_in.op == "Reshape" and view.only_consumer(grouped) is inorm,
            "the InstanceNormalization does not read a Reshape of its own")
    x = reshape_in.inputs[0]
    group_shape = constant_values(reshape_in.inputs[1])
    require(x.shape is not None and len(x.shape) >= 3 and isinstance(x.shape[1], int) and group_shape is not None,
            "the grouped tensor has no static channel count or constant group shape")
    channels, rank = x.shape[1], len(x.shape)
    require(group_shape.shape == (3,) and group_shape[2] == -1 and group_shape[0] in (0, x.shape[0]),
            "the first Reshape is not [N, G, -1]")
    groups = int(group_shape[1])
    require(groups > 0 and channels % groups == 0 and not reshape_in.attrs.get("allowzero", 0),
            "the group count does not divide the channels")
    ones, zeros = constant_values(inorm.inputs[1]), constant_values(inorm.inputs[2])
    require(ones is not None and zeros is not None and np.all(ones == 1) and np.all(zeros == 0),
            "the InstanceNormalization has its own scale or bias")
    reshape_out = view.only_consumer(inorm.outputs[0], "Reshape")
    require(reshape_out is not None and reshape_out.inputs[0] is inorm.outputs[0],
            "the normalized groups are not reshaped back")
    shape_node = _restores_shape(reshape_out, x, view)
    members = [(reshape_in, "reshape_in"), (inorm, "instance_norm")]
    members += [(shape_node, "shape")] if shape_node is not None else []
    members.append((reshape_out, "reshape_out"))
    # Optional per-channel affine (absent for affine=False and for AdaGroupNorm's run-time scale).
    tail, gamma, beta = reshape_out.outputs[0], None, None
    nxt = view.only_consumer(tail, "Mul")
    if (gamma := _affine(nxt, channels, rank)) is not None:
        members.append((nxt, "gamma"))
        tail = nxt.outputs[0]
    nxt = view.only_consumer(tail, "Add")
    if (beta := _affine(nxt, channels, rank)) is not None:
        members.append((nxt, "beta"))
    return GroupNormMatch(tuple(members), x, groups, channels, float(inorm.attrs.get("epsilon", 1e-5)),
                          np.ones(channels, np.float32) if gamma is None else gamma,
                          np.zeros(channels, np.float32) if beta is None else beta)
