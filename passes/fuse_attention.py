"""Find scaled-dot-product attention and record each occurrence as one unit.

Why mark instead of replace: at the opsets the exporters write (18-20) ONNX has no attention
operator (`Attention` arrives in opset 23), and the targets want different things from the same
nodes: TensorRT fuses Q/DQ around the two batched matmuls into one MHA kernel, QNN and TFLite want
both matmuls quantized with matching scales, a mixed-precision plan may keep the whole unit float.
So the nodes stay as they are and each one gets node metadata `qcompile.fused` = "attention:<n>"
and `qcompile.fused_role` (one of `ROLES`); `find_attention` returns the same units as frozen
dataclasses naming the nodes and the tensors the two matmuls read.

What is matched (every form the diffusers processors export to, dynamo and legacy):
    [Mul|Div scale on Q and/or K] -> MatMul(Q, K^T) -> [Mul|Div scale] [Add|Where mask] [Cast]
        -> Softmax(last axis) -> [Cast] [IsNaN/Where guard] -> MatMul(P, V)
Both matmuls must read two activations (no constant operand), which is what tells attention from a
Softmax feeding a linear layer. A scale operand may be a constant or a shape-derived scalar (the
legacy exporter computes 1/sqrt(sqrt(d)) from Shape at run time). Transposes and Reshapes around the
unit are layout, not part of it. NVIDIA ModelOpt's matcher misses these graphs because it expects
the scale after the Q·K matmul; dynamo puts sqrt(scale) on Q and on K before it.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_graphsurgeon as gs

from qcompile.graph_io import constant_values
from qcompile.pass_manager import GraphProperty, Pass, PassContext, PassResult
from qcompile.rewrite import (
    GraphView,
    NoMatch,
    Pattern,
    clear_stale,
    consumers,
    find,
    is_activation,
    mark_unit,
    producer,
    require,
)

KIND = "attention"
ROLES = ("scale", "qk_matmul", "mask", "cast", "softmax", "guard", "av_matmul")
# Longest chain of scale/mask/cast nodes accepted between the Q·K matmul and the Softmax.
MAX_CHAIN = 6


@dataclass(frozen=True)
class AttentionUnit:
    """One attention occurrence; node and tensor names as they are in the graph."""

    index: int
    qk_matmul: str
    softmax: str
    av_matmul: str
    scale: tuple[str, ...] = ()  # Mul/Div by a scalar on Q, on K or on the scores
    mask: tuple[str, ...] = ()  # Add/Where applying an attention mask to the scores
    cast: tuple[str, ...] = ()  # Casts around the Softmax (half-precision exports)
    guard: tuple[str, ...] = ()  # IsNaN/Where that zero fully masked rows after Softmax
    query: str = ""  # the two inputs of the Q·K matmul, after any scale
    key: str = ""
    value: str = ""  # V, the second input of the P·V matmul
    output: str = ""  # the P·V matmul's output

    @property
    def unit_id(self) -> str:
        return f"{KIND}:{self.index}"

    def roles(self) -> tuple[tuple[str, str], ...]:
        """(node name, role) for every node of the unit, grouped by role in `ROLES` order."""
        pairs = [(n, "scale") for n in self.scale] + [(self.qk_matmul, "qk_matmul")]
        pairs += [(n, "mask") for n in self.mask] + [(n, "cast") for n in self.cast]
        pairs += [(self.softmax, "softmax")] + [(n, "guard") for n in self.guard]
        return (*pairs, (self.av_matmul, "av_matmul"))

    @property
    def nodes(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.roles())


@dataclass(frozen=True)
class AttentionMatch:
    """What the pattern found from one Softmax: every node with its role, and the matmuls' operands."""

    members: tuple[tuple[gs.Node, str], ...]
    qk: gs.Node
    softmax: gs.Node
    av: gs.Node

    @property
    def nodes(self) -> tuple[gs.Node, ...]:
        return tuple(node for node, _ in self.members)

    def unit(self, index: int) -> AttentionUnit:
        named = [(node.name, role) for node, role in self.members]
        return AttentionUnit(
            index=index, qk_matmul=self.qk.name, softmax=self.softmax.name, av_matmul=self.av.name,
            **{role: tuple(n for n, r in named if r == role) for role in ("scale", "mask", "cast", "guard")},
            query=self.qk.inputs[0].name, key=self.qk.inputs[1].name, value=self.av.inputs[1].name,
            output=self.av.outputs[0].name)


class AttentionPattern(Pattern[AttentionMatch]):
    """Scaled-dot-product attention, found from its Softmax (see the module docstring)."""

    name = "fuse-attention"
    anchors = frozenset({"Softmax"})

    def match(self, anchor: gs.Node, view: GraphView) -> AttentionMatch:
        require(_softmax_on_last_axis(anchor), "the Softmax is not over the last axis")
        score_roles: list[tuple[gs.Node, str]] = []
        qk = _walk_scores(anchor.inputs[0], 0, view, score_roles)
        require(qk is not None, f"no Q·K MatMul of two activations within {MAX_CHAIN} scale/mask/cast nodes "
                                "before the Softmax")
        prob_roles: list[tuple[gs.Node, str]] = []
        av = _walk_probs(anchor.outputs[0], view, prob_roles)
        q_scales = _operand_scales(qk.inputs[0], view)
        k_scales = _operand_scales(qk.inputs[1], view)
        roles = score_roles + prob_roles
        members = [(n, "scale") for n in (*q_scales, *k_scales)] + [(n, r) for n, r in roles if r == "scale"]
        members.append((qk, "qk_matmul"))
        members += [(n, r) for n, r in roles if r in ("mask", "cast")]
        members.append((anchor, "softmax"))
        members += [(n, r) for n, r in roles if r == "guard"]
        members.append((av, "av_matmul"))
        return AttentionMatch(tuple(_grouped(members)), qk, anchor, av)


def _grouped(members: list[tuple[gs.Node, str]]) -> list[tuple[gs.Node, str]]:
    """Members ordered by role as `ROLES` lists them (mask before cast), stable within a role."""
    return sorted(members, key=lambda m: ROLES.index(m[1]))


def find_attention(graph: gs.Graph) -> list[AttentionUnit]:
    """Every attention unit in graph order (numbered by the position of its Softmax)."""
    return [m.unit(i) for i, m in enumerate(find(graph, AttentionPattern()).matches)]


class FuseAttention(Pass):
    """Annotate every attention unit (see module docstring); nodes and numerics are untouched."""

    name = "fuse-attention"
    requires = frozenset({GraphProperty.NODES_NAMED})
    preserves = frozenset({GraphProperty.NODES_NAMED, GraphProperty.SHAPES_KNOWN, GraphProperty.QDQ_PAIRED})

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        report = find(graph, AttentionPattern())
        changed = False
        for index, match in enumerate(report.matches):
            changed |= mark_unit(match.members, match.unit(index).unit_id)
        changed |= clear_stale(graph, KIND, {n.name for m in report.matches for n in m.nodes})
        return PassResult(modified=changed, detail=report.detail(f"{len(report.matches)} attention units"))


# --- matching ------------------------------------------------------------------------------------
def _scalar_like(t: gs.Tensor) -> bool:
    """A constant or a run-time value with at most one element (a shape-derived softmax scale)."""
    values = constant_values(t)
    if values is not None:
        return values.size == 1
    shape = t.shape
    return shape is not None and all(isinstance(d, int) for d in shape) and all(d == 1 for d in shape)


def _scale_data_input(node: gs.Node) -> gs.Tensor | None:
    """The data operand of a Mul/Div by a scalar, else None (Div only divides by the scalar)."""
    if node.op == "Mul":
        a, b = node.inputs
        if _scalar_like(b) and not _scalar_like(a):
            return a
        if _scalar_like(a) and not _scalar_like(b):
            return b
    if node.op == "Div" and _scalar_like(node.inputs[1]) and not _scalar_like(node.inputs[0]):
        return node.inputs[0]
    return None


def _is_qk(node: gs.Node) -> bool:
    return node.op == "MatMul" and all(is_activation(t) for t in node.inputs)


def _walk_scores(t: gs.Tensor, depth: int, view: GraphView, roles: list[tuple[gs.Node, str]]) -> gs.Node | None:
    """From the Softmax input back to the Q·K MatMul through scale/mask/cast nodes; roles collected."""
    node = producer(t)
    if node is None or depth > MAX_CHAIN or not view.single_use(t):
        return None
    if _is_qk(node):
        return node
    candidates: list[tuple[gs.Tensor, str]] = []
    scaled = _scale_data_input(node)
    if scaled is not None:
        candidates.append((scaled, "scale"))
    elif node.op == "Add":
        candidates += [(node.inputs[0], "mask"), (node.inputs[1], "mask")]
    elif node.op == "Where":
        candidates += [(node.inputs[2], "mask"), (node.inputs[1], "mask")]
    elif node.op == "Cast":
        candidates.append((node.inputs[0], "cast"))
    for data, role in candidates:
        found: list[tuple[gs.Node, str]] = []
        qk = _walk_scores(data, depth + 1, view, found)
        if qk is not None:
            roles += [(node, role), *found]
            return qk
    return None


def _walk_probs(t: gs.Tensor, view: GraphView, roles: list[tuple[gs.Node, str]]) -> gs.Node:
    """From the Softmax output forward to the P·V MatMul through casts and a NaN guard."""
    for _ in range(MAX_CHAIN):
        require(t.name not in view.outputs, "the attention probabilities are a graph output")
        readers = consumers(t)
        if len(readers) == 1 and readers[0].op == "MatMul":
            node = readers[0]
            require(node.inputs[0] is t and node.inputs[1] is not t and is_activation(node.inputs[1]),
                    "the probabilities are not multiplied by an activation V")
            return node
        if len(readers) == 1 and readers[0].op == "Cast":
            roles.append((readers[0], "cast"))
            t = readers[0].outputs[0]
            continue
        # torch's NaN guard for fully masked rows: Where(IsNaN(p), 0, p).
        require(sorted(c.op for c in readers) == ["IsNaN", "Where"],
                "the Softmax does not reach a P·V MatMul through casts and a NaN guard")
        isnan = next(c for c in readers if c.op == "IsNaN")
        where = next(c for c in readers if c.op == "Where")
        require(where.inputs[0] is isnan.outputs[0] and where.inputs[2] is t
                and view.only_consumer(isnan.outputs[0]) is where and constant_values(where.inputs[1]) is not None,
                "the Softmax is followed by an IsNaN/Where that is not a NaN guard")
        roles += [(isnan, "guard"), (where, "guard")]
        t = where.outputs[0]
    raise NoMatch(f"no P·V MatMul within {MAX_CHAIN} nodes after the Softmax")


def _softmax_on_last_axis(node: gs.Node) -> bool:
    axis = node.attrs.get("axis", -1)
    rank = len(node.inputs[0].shape) if node.inputs[0].shape is not None else None
    return axis == -1 or (rank is not None and axis == rank - 1)


def _operand_scales(t: gs.Tensor, view: GraphView) -> list[gs.Node]:
    """Scale nodes applied to Q or K before the matmul (dynamo puts sqrt(scale) on each)."""
    nodes: list[gs.Node] = []
    node = producer(t)
    while node is not None and len(nodes) < 2 and view.only_consumer(node.outputs[0]) is not None:
        data = _scale_data_input(node)
        if data is None:
            break
        nodes.append(node)
        node = producer(data)
    return nodes
