"""The pass contract and the PassManager that runs explicit pass lists.

A pass rewrites a graph in place and says whether it changed anything. It declares the graph
properties it needs (`requires`) and those it establishes (`ensures`); the manager checks them, so a
pipeline in the wrong order fails at once with the pass named, not later with a wrong number.
Each run is logged (time, node-count change), and the graph can be dumped after a named pass.
"""

from __future__ import annotations

import abc
import enum
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import onnx_graphsurgeon as gs

log = logging.getLogger("qcompile.passes")


class GraphProperty(enum.Enum):
    SHAPES_KNOWN = "every tensor has a dtype and shape"
    NODES_NAMED = "every node has a unique name"
    QDQ_PAIRED = "every QuantizeLinear feeds a DequantizeLinear"


@dataclass(frozen=True)
class PassResult:
    modified: bool
    detail: str = ""


@dataclass(frozen=True)
class PassLogEntry:
    name: str
    seconds: float
    nodes_before: int
    nodes_after: int
    modified: bool
    detail: str = ""

    def as_dict(self) -> dict[str, object]:
        return {
            "pass": self.name,
            "seconds": round(self.seconds, 4),
            "nodes_before": self.nodes_before,
            "nodes_after": self.nodes_after,
            "modified": self.modified,
            "detail": self.detail,
        }


@dataclass
class PassContext:
    """What passes may read besides the graph; the log the manager writes."""

    dump_after: frozenset[str] = frozenset()
    dump_dir: Path | None = None
    log: list[PassLogEntry] = field(default_factory=list)
    properties: set[GraphProperty] = field(default_factory=set)


class Pass(abc.ABC):
    """One graph rewrite. Subclasses set `name` and implement `run`; they mutate `graph` in place."""

    name: ClassVar[str]
    requires: ClassVar[frozenset[GraphProperty]] = frozenset()
    ensures: ClassVar[frozenset[GraphProperty]] = frozenset()
    # Properties that survive this pass even when it modifies the graph.
    preserves: ClassVar[frozenset[GraphProperty]] = frozenset()

    @abc.abstractmethod
    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult: ...

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class PassOrderError(RuntimeError):
    """A pipeline bug: a pass ran before the passes that establish what it requires."""


class PassManager:
    """Runs an explicit list of passes once, or repeatedly until none modifies the graph."""

    def __init__(self, passes: Sequence[Pass], *, fixed_point: bool = False, max_iterations: int = 8):
        self.passes = tuple(passes)
        self.fixed_point = fixed_point
        self.max_iterations = max_iterations

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        any_modified = False
        for _ in range(self.max_iterations if self.fixed_point else 1):
            round_modified = False
            for p in self.passes:
                round_modified |= self._run_one(p, graph, ctx)
            any_modified |= round_modified
            if not round_modified:
                break
        return PassResult(modified=any_modified)

    def _run_one(self, p: Pass, graph: gs.Graph, ctx: PassContext) -> bool:
        missing = p.requires - ctx.properties
        if missing:
            names = ", ".join(sorted(m.name for m in missing))
            raise PassOrderError(f"pass '{p.name}' requires {names}, which no earlier pass ensured")
        before = len(graph.nodes)
        start = time.perf_counter()
        result = p.run(graph, ctx)
        seconds = time.perf_counter() - start
        if result.modified:
            ctx.properties &= set(p.preserves | p.ensures)
        ctx.properties |= set(p.ensures)
        entry = PassLogEntry(p.name, seconds, before, len(graph.nodes), result.modified, result.detail)
        ctx.log.append(entry)
        log.info("%-28s %7.3fs nodes %5d -> %5d%s", p.name, seconds, before, len(graph.nodes),
                 f"  ({result.detail})" if result.detail else "")
        if p.name in ctx.dump_after and ctx.dump_dir is not None:
            from qcompile.graph_io import save_graph

            save_graph(graph, ctx.dump_dir / f"after_{p.name}.onnx")
        return result.modified
