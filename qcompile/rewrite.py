"""The matching layer the fusions and rewrites in passes/ are written on: graph queries, and rules as
pattern + check + replacement over onnx-graphsurgeon graphs.

A `Pattern` starts at nodes of its anchor ops. `match` walks the graph from there and returns the
match (the nodes it covers and what the replacement needs) or raises `NoMatch` with a reason: the
node is not this pattern at all (a Softmax with no Q·K MatMul before it). `check` then says why a
match must not be rewritten, as a reason string (an intermediate is read elsewhere, the epsilon is
not a scalar, no calibrated range): that is a *rejected candidate*, the thing a user asks about when
a fusion did not fire. Both are logged at debug level on `qcompile.rewrite`; rejections are also
counted per reason in the `Report`, which the passes put in their detail (the pass log, the
manifest). A `Rule` adds `rewrite`, which edits the graph through an `Edit` that tags every node it
adds with the rule's name (`graph_io.tag_new_node`). A node belongs to one match at most: nodes a
match covers are not tried as anchors again.

Why not onnxscript's pattern rewriter (`onnxscript.rewriter`, already a dependency): it is the model
for this module (pattern / condition with a failure reason / replacement, new nodes tagged with the
rule name), but it works on onnx_ir, and qcompile's passes mutate onnx-graphsurgeon graphs.
- Cost: each pass would convert gs -> ModelProto -> onnx_ir and back. On the reference UNet's
  canonical graph (845 nodes) that round trip took 0.13-0.46 s (depending on load), while matching
  takes 0.2-23 ms per fusion pass (FuseGroupNorm, 30 units, the slowest), and a target runs its
  passes once per timestep bucket.
- Weights: `graph_io` keeps external weights as memory-mapped `ExternalValues`, copied file to file
  on save. After a round trip they come back as plain lazy values with a relative data path, to be
  re-attached after every pass (or loaded, which is what `graph_io` exists to avoid).
- Metadata: `node.meta` (module path, pass provenance, unit annotations) would survive only by being
  written to `metadata_props` and read back; onnxscript gives a replacement the metadata of the
  first matched node (whichever it is) and its rule name under its own key, where qcompile tags
  `qcompile.pass` and inherits the module path of the node the replacement stands for.
- Patterns here are not all fixed DAGs: attention accepts a chain of up to six scale/mask/cast
  nodes, GELU any association of a Mul tree, GroupNorm an optional affine, and some passes only
  annotate a unit (no replacement). Each would need an onnxscript pattern per variant or a custom
  matcher anyway.
- Rejection reasons: onnxscript reports them through a `MatchingTracer` meant for interactive
  debugging; here they are counted per pass, so a build's pass log says why a fusion did not fire
  ("28 the input shape is not static").
"""

from __future__ import annotations

import abc
import logging
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Generic, Protocol, TypeVar

import numpy as np
import onnx_graphsurgeon as gs

from qcompile.graph_io import constant_values, node_meta, tag_new_node

log = logging.getLogger("qcompile.rewrite")


# --- graph queries -------------------------------------------------------------------------------
def producer(t: gs.Tensor) -> gs.Node | None:
    """The node writing `t`; None for graph inputs and constants."""
    return t.inputs[0] if len(t.inputs) == 1 else None


def consumers(t: gs.Tensor) -> list[gs.Node]:
    """The nodes reading `t`, each once (a node reading it twice, Mul(d, d), appears once)."""
    return list({id(c): c for c in t.outputs}.values())


def reader(t: gs.Tensor, op: str) -> gs.Node | None:
    """The first node of type `op` reading `t`, whoever else reads it (a match's `check` then decides,
    with a reason, whether the other readers forbid the rewrite)."""
    return next((c for c in t.outputs if c.op == op), None)


def other_operand(node: gs.Node, t: gs.Tensor) -> gs.Tensor:
    """The input of a two-input node that is not `t`."""
    return node.inputs[1] if node.inputs[0] is t else node.inputs[0]


def is_activation(t: gs.Tensor) -> bool:
    """Computed at run time: neither a constant nor the output of a Constant node."""
    return not isinstance(t, gs.Constant) and constant_values(t) is None


def scalar_value(t: gs.Tensor) -> float | None:
    """The value of a one-element constant, else None."""
    values = constant_values(t)
    return float(values.reshape(-1)[0]) if values is not None and values.size == 1 else None


def is_scalar(t: gs.Tensor, value: float, rel_tol: float = 0.0) -> bool:
    """`t` is a one-element constant equal to `value` (within `rel_tol`: exporters round constants)."""
    v = scalar_value(t)
    return v is not None and math.isclose(v, value, rel_tol=rel_tol)


def per_channel(t: gs.Tensor, channels: int, rank: int) -> np.ndarray | None:
    """A constant's values as float32 [C] when it broadcasts against a rank-`rank` tensor along the
    channel axis (1) only ([C, 1, 1], [1, C, 1, 1], or one value for all), else None."""
    values = constant_values(t)
    if values is None or values.ndim > rank:
        return None
    padded = values.reshape((1,) * (rank - values.ndim) + values.shape)
    if any(d != 1 for i, d in enumerate(padded.shape) if i != 1) or padded.shape[1] not in (1, channels):
        return None
    return np.broadcast_to(padded.reshape(-1), (channels,)).astype(np.float32)


def weight_axis(node: gs.Node, weight_rank: int) -> int | None:
    """The output-channel axis of the weight (input 1) of a Conv, Gemm or MatMul; None otherwise."""
    if node.op == "Conv":
        return 0
    if node.op == "Gemm":
        return 0 if node.attrs.get("transB", 0) else 1
    if node.op == "MatMul":
        return weight_rank - 1 if weight_rank >= 2 else None
    return None


def is_static(shape: Sequence | None) -> bool:
    """Every dimension a known, non-negative integer."""
    return shape is not None and all(isinstance(d, int | np.integer) and d >= 0 for d in shape)


def subgraph(sources: Iterable[gs.Tensor], results: Iterable[gs.Tensor]) -> tuple[gs.Node, ...]:
    """The nodes computing `results` from `sources`: every producer found walking back from the results,
    stopping at the sources, constants and graph inputs (a match's nodes, from its input and output)."""
    stop = {id(t) for t in sources}
    seen: dict[int, gs.Node] = {}
    todo = list(results)
    while todo:
        t = todo.pop()
        node = producer(t)
        if id(t) in stop or node is None or id(node) in seen or node.op == "Constant":
            continue
        seen[id(node)] = node
        todo.extend(node.inputs)
    return tuple(seen.values())


@dataclass(frozen=True)
class GraphView:
    """The graph a pattern is matched on, with its output names (an output must keep its tensor)."""

    graph: gs.Graph
    outputs: frozenset[str]

    @classmethod
    def of(cls, graph: gs.Graph) -> GraphView:
        return cls(graph, frozenset(t.name for t in graph.outputs))

    def single_use(self, t: gs.Tensor) -> bool:
        """Read by exactly one node and not a graph output: a pattern may absorb it."""
        return len(consumers(t)) == 1 and t.name not in self.outputs

    def only_consumer(self, t: gs.Tensor, op: str | None = None) -> gs.Node | None:
        """The one node reading `t` (of type `op` when given), when `t` is no graph output."""
        readers = consumers(t)
        if len(readers) != 1 or t.name in self.outputs or (op is not None and readers[0].op != op):
            return None
        return readers[0]

    def escaping(self, nodes: Iterable[gs.Node], results: Iterable[gs.Tensor]) -> gs.Tensor | None:
        """A tensor written inside `nodes`, other than `results`, that is read outside them or is a
        graph output (replacing the nodes would lose it); None when there is none."""
        inside = {id(n) for n in nodes}
        kept = {id(t) for t in results}
        for node in nodes:
            for t in node.outputs:
                if id(t) in kept:
                    continue
                if t.name in self.outputs or any(id(c) not in inside for c in t.outputs):
                    return t
        return None


# --- rules ---------------------------------------------------------------------------------------
class NoMatch(Exception):
    """The anchor is not this pattern; `reason` says where the walk stopped."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def require(condition: object, reason: str) -> None:
    """Stop matching with `reason` unless `condition` holds."""
    if not condition:
        raise NoMatch(reason)


class Matched(Protocol):
    """What every match gives the engine: the nodes it covers (claimed: no other match may use them)."""

    @property
    def nodes(self) -> tuple[gs.Node, ...]: ...


M = TypeVar("M", bound=Matched)


class Pattern(abc.ABC, Generic[M]):
    """A structure found from anchor nodes; `check` refuses matches with a reason."""

    name: ClassVar[str]
    anchors: ClassVar[frozenset[str]]  # op types a match starts at

    @abc.abstractmethod
    def match(self, anchor: gs.Node, view: GraphView) -> M:
        """The match starting at `anchor`, or raise `NoMatch` (see `require`)."""

    def check(self, match: M, view: GraphView) -> str | None:
        """Why `match` must be left alone, or None to accept it."""
        return None


class Rule(Pattern[M]):
    """A pattern with a replacement."""

    @abc.abstractmethod
    def rewrite(self, match: M, edit: Edit) -> None:
        """Replace the match through `edit`; the matched nodes left without readers are removed after
        all rules ran."""


class Edit:
    """How a rule changes the graph: nodes added here carry the rule's name as their provenance."""

    def __init__(self, graph: gs.Graph, rule: str):
        self.graph = graph
        self.rule = rule

    def add(self, op: str, name: str, inputs: Sequence[gs.Tensor], outputs: Sequence[gs.Tensor],
            attrs: dict | None = None, *, like: gs.Node | None = None) -> gs.Node:
        """A new node. An output that some matched node wrote is taken over: it keeps its name (under
        which calibrated ranges are recorded) and its readers, and the old writer loses it."""
        for t in outputs:
            for old in list(t.inputs):
                old.outputs.remove(t)
        node = gs.Node(op, name, dict(attrs or {}), list(inputs), list(outputs))
        self.graph.nodes.append(tag_new_node(node, self.rule, like))
        return node


@dataclass
class Report(Generic[M]):
    """What one run of patterns found: the matches (rewritten, for rules) and the rejected candidates."""

    matches: list[M] = field(default_factory=list)
    rejected: Counter[str] = field(default_factory=Counter)

    def detail(self, done: str) -> str:
        """`done`, then the rejections by reason, most frequent first."""
        if not self.rejected:
            return done
        ranked = sorted(self.rejected.items(), key=lambda item: (-item[1], item[0]))
        return f"{done}; rejected: " + ", ".join(f"{n} {reason}" for reason, n in ranked)


def find(graph: gs.Graph, pattern: Pattern[M]) -> Report[M]:
    """Every match of `pattern` in graph order; the graph is not changed."""
    return _run(graph, [pattern], rewrite=False)


def apply(graph: gs.Graph, rules: Sequence[Rule]) -> Report:
    """Rewrite every match of `rules` (tried in order at each node), then drop what no longer feeds
    an output and restore topological order."""
    report = _run(graph, rules, rewrite=True)
    if report.matches:
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return report


def _run(graph: gs.Graph, patterns: Sequence[Pattern], *, rewrite: bool) -> Report:
    view = GraphView.of(graph)
    report: Report = Report()
    taken: set[int] = set()
    for node in list(graph.nodes):
        if id(node) in taken or not node.outputs:  # claimed by a match, or detached by a rewrite
            continue
        for pattern in patterns:
            if node.op not in pattern.anchors:
                continue
            match = _try(pattern, node, view, taken, report)
            if match is None:
                continue
            taken.update(id(n) for n in match.nodes)
            if rewrite:
                pattern.rewrite(match, Edit(graph, pattern.name))
            report.matches.append(match)
            break
    return report


def _try(pattern: Pattern[M], node: gs.Node, view: GraphView, taken: set[int], report: Report) -> M | None:
    try:
        match = pattern.match(node, view)
    except NoMatch as miss:
        log.debug("%s: %s '%s' does not match: %s", pattern.name, node.op, node.name, miss.reason)
        return None
    reason = pattern.check(match, view)
    if reason is None and any(id(n) in taken for n in match.nodes):
        reason = "overlaps an earlier match"
    if reason is not None:
        log.debug("%s: %s '%s' rejected: %s", pattern.name, node.op, node.name, reason)
        report.rejected[reason] += 1
        return None
    return match


# --- annotated units -----------------------------------------------------------------------------
# A pattern whose nodes stay (no operator exists at the exporters' opsets, or targets want the parts)
# is recorded as a unit: each node gets `FUSED_KEY` = "<kind>:<n>" and its `ROLE_KEY` in node metadata,
# which survives save and load (graph_io) and is what targets lower or place Q/DQ by.
FUSED_KEY = "qcompile.fused"
ROLE_KEY = "qcompile.fused_role"


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


def unit_of(node: gs.Node) -> tuple[str, str] | None:
    """(unit id, role) of an annotated node, else None."""
    meta = node_meta(node)
    return (meta[FUSED_KEY], meta.get(ROLE_KEY, "")) if FUSED_KEY in meta else None


def unit_members(graph: gs.Graph, unit_id: str) -> dict[str, list[gs.Node]]:
    """role -> nodes annotated with `unit_id`, in graph order."""
    members: dict[str, list[gs.Node]] = {}
    for node in graph.nodes:
        found = unit_of(node)
        if found is not None and found[0] == unit_id:
            members.setdefault(found[1], []).append(node)
    return members
