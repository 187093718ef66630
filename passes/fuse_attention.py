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

from collections.abc import Iterable
from dataclasses import dataclass

import onnx_graphsurgeon as gs

from qcompile.graph_io import constant_values, node_meta
from qcompile.pass_manager import GraphProperty, Pass, PassContext, PassResult

# Unit annotations shared by the passes that record a group of nodes as one unit (fuse_groupnorm too).
FUSED_KEY = "qcompile.fused"
ROLE_KEY = "qcompile.fused_role"
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


def find_attention(graph: gs.Graph) -> list[AttentionUnit]:
    """Every attention unit in graph order (numbered by the position of its Softmax)."""
    units: list[AttentionUnit] = []
    for node in graph.nodes:
        if node.op == "Softmax":
            unit = _match(node, len(units), {t.name for t in graph.outputs})
            if unit is not None:
                units.append(unit)
    return units


class FuseAttention(Pass):
    """Annotate every attention unit (see module docstring); nodes and numerics are untouched."""

    name = "fuse-attention"
    requires = frozenset({GraphProperty.NODES_NAMED})
    preserves = frozenset({GraphProperty.NODES_NAMED, GraphProperty.SHAPES_KNOWN, GraphProperty.QDQ_PAIRED})

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        units = find_attention(graph)
        nodes = {n.name: n for n in graph.nodes}
        changed = False
        for unit in units:
            changed |= mark_unit(((nodes[n], role) for n, role in unit.roles()), unit.unit_id)
        changed |= clear_stale(graph, KIND, {n for u in units for n in u.nodes})
        return PassResult(modified=changed, detail=f"{len(units)} attention units")


# --- unit annotations (shared with fuse_groupnorm) ----------------------------------------------
def mark_unit(members: Iterable[tuple[gs.Node, str]], unit_id: str) -> bool:
    """Write `unit_id` and each node's role into its metadata; True when something changed."""
    changed = False
    for node, role in members:
        meta = node_meta(node)
        if meta.get(FUSED_KEY) != unit_id or meta.get(ROLE_KEY) != role:
            meta[FUSED_KEY] = unit_id
            meta[ROLE_KEY] = role
            changed = True
    return changed


def clear_stale(graph: gs.Graph, kind: str, keep: set[str]) -> bool:
    """Drop `kind` annotations from nodes outside `keep` (a unit that no longer matches)."""
    changed = False
    for node in graph.nodes:
        meta = node_meta(node)
        if meta.get(FUSED_KEY, "").startswith(kind + ":") and node.name not in keep:
            del meta[FUSED_KEY]
            meta.pop(ROLE_KEY, None)
            changed = True
    return changed


def unit_members(graph: gs.Graph, unit_id: str) -> dict[str, list[gs.Node]]:
    """role -> nodes annotated with `unit_id`, in graph order."""
    members: dict[str, list[gs.Node]] = {}
    for node in graph.nodes:
        meta = node_meta(node)
        if meta.get(FUSED_KEY) == unit_id:
            members.setdefault(meta.get(ROLE_KEY, ""), []).append(node)
    return members


# --- matching ------------------------------------------------------------------------------------
def _producer(t: gs.Tensor) -> gs.Node | None:
    return t.inputs[0] if len(t.inputs) == 1 else None


def _only_consumer(t: gs.Tensor, graph_outputs: set[str]) -> gs.Node | None:
    consumers = {id(c): c for c in t.outputs}
    if len(consumers) != 1 or t.name in graph_outputs:
        return None
    return next(iter(consumers.values()))


def _is_activation(t: gs.Tensor) -> bool:
    return not isinstance(t, gs.Constant) and constant_values(t) is None


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
    return node.op == "MatMul" and all(_is_activation(t) for t in node.inputs)


def _walk_scores(t: gs.Tensor, depth: int, outs: set[str], roles: list[tuple[str, str]]) -> gs.Node | None:
    """From the Softmax input back to the Q·K MatMul through scale/mask/cast nodes; roles collected."""
    node = _producer(t)
    if node is None or depth > MAX_CHAIN or _only_consumer(t, outs) is None:
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
        found: list[tuple[str, str]] = []
        qk = _walk_scores(data, depth + 1, outs, found)
        if qk is not None:
            roles += [(node.name, role), *found]
            return qk
    return None


def _walk_probs(t: gs.Tensor, outs: set[str], roles: list[tuple[str, str]]) -> gs.Node | None:
    """From the Softmax output forward to the P·V MatMul through casts and a NaN guard."""
    for _ in range(MAX_CHAIN):
        if t.name in outs:
            return None
        consumers = list({id(c): c for c in t.outputs}.values())
        if len(consumers) == 1 and consumers[0].op == "MatMul":
            node = consumers[0]
            ok = node.inputs[0] is t and node.inputs[1] is not t and _is_activation(node.inputs[1])
            return node if ok else None
        if len(consumers) == 1 and consumers[0].op == "Cast":
            roles.append((consumers[0].name, "cast"))
            t = consumers[0].outputs[0]
            continue
        # torch's NaN guard for fully masked rows: Where(IsNaN(p), 0, p).
        ops = sorted(c.op for c in consumers)
        if ops != ["IsNaN", "Where"]:
            return None
        isnan = next(c for c in consumers if c.op == "IsNaN")
        where = next(c for c in consumers if c.op == "Where")
        if where.inputs[0] is not isnan.outputs[0] or where.inputs[2] is not t:
            return None
        if _only_consumer(isnan.outputs[0], outs) is not where or constant_values(where.inputs[1]) is None:
            return None
        roles += [(isnan.name, "guard"), (where.name, "guard")]
        t = where.outputs[0]
    return None


def _softmax_on_last_axis(node: gs.Node) -> bool:
    axis = node.attrs.get("axis", -1)
    rank = len(node.inputs[0].shape) if node.inputs[0].shape is not None else None
    return axis == -1 or (rank is not None and axis == rank - 1)


def _operand_scales(t: gs.Tensor, outs: set[str]) -> list[str]:
    """Scale nodes applied to Q or K before the matmul (dynamo puts sqrt(scale) on each)."""
    names: list[str] = []
    node = _producer(t)
    while node is not None and len(names) < 2 and _only_consumer(node.outputs[0], outs) is not None:
        data = _scale_data_input(node)
        if data is None:
            break
        names.append(node.name)
        node = _producer(data)
    return names


def _match(softmax: gs.Node, index: int, outs: set[str]) -> AttentionUnit | None:
    if not _softmax_on_last_axis(softmax):
        return None
    score_roles: list[tuple[str, str]] = []
    qk = _walk_scores(softmax.inputs[0], 0, outs, score_roles)
    if qk is None:
        return None
    prob_roles: list[tuple[str, str]] = []
    av = _walk_probs(softmax.outputs[0], outs, prob_roles)
    if av is None:
        return None
    q_scales = _operand_scales(qk.inputs[0], outs)
    k_scales = _operand_scales(qk.inputs[1], outs)
    roles = score_roles + prob_roles
    return AttentionUnit(
        index=index, qk_matmul=qk.name, softmax=softmax.name, av_matmul=av.name,
        scale=(*q_scales, *k_scales, *(n for n, r in roles if r == "scale")),
        mask=tuple(n for n, r in roles if r == "mask"),
        cast=tuple(n for n, r in roles if r == "cast"),
        guard=tuple(n for n, r in roles if r == "guard"),
        query=qk.inputs[0].name, key=qk.inputs[1].name, value=av.inputs[1].name, output=av.outputs[0].name,
    )
