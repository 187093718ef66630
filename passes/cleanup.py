"""Small structural clean-ups every pipeline starts with: Identity removal, dead nodes, unique names."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from qcompile.graph_io import redirect_consumers
from qcompile.pass_manager import GraphProperty, Pass, PassContext, PassResult


class RemoveIdentity(Pass):
    """Bypass Identity nodes (exporters leave many); one feeding a graph output is kept."""

    name = "remove-identity"
    preserves = frozenset({GraphProperty.NODES_NAMED, GraphProperty.SHAPES_KNOWN})

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        outputs = {t.name for t in graph.outputs}
        removed = 0
        for node in list(graph.nodes):
            if node.op != "Identity" or node.outputs[0].name in outputs:
                continue
            src, dst = node.inputs[0], node.outputs[0]
            redirect_consumers(dst, src)
            node.outputs.clear()
            removed += 1
        if removed:
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(modified=bool(removed), detail=f"{removed} removed")


class EliminateDeadNodes(Pass):
    """Drop nodes and tensors nothing reads; keep a topological order."""

    name = "eliminate-dead-nodes"
    preserves = frozenset({GraphProperty.NODES_NAMED, GraphProperty.SHAPES_KNOWN})

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        before = len(graph.nodes)
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        removed = before - len(graph.nodes)
        return PassResult(modified=bool(removed), detail=f"{removed} removed")


class NameNodes(Pass):
    """Give every node a unique, non-empty name: reports, exclusions and dumps refer to nodes by name."""

    name = "name-nodes"
    ensures = frozenset({GraphProperty.NODES_NAMED})
    preserves = frozenset({GraphProperty.SHAPES_KNOWN})

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        seen: set[str] = set()
        renamed = 0
        for i, node in enumerate(graph.nodes):
            name = node.name or f"{node.op}_{i}"
            while name in seen:
                name = f"{name}_{i}"
            if name != node.name:
                node.name = name
                renamed += 1
            seen.add(name)
        return PassResult(modified=bool(renamed), detail=f"{renamed} renamed")
