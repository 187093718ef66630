"""The pass contract, the PassManager that runs explicit pass lists, and instruments that watch a run.

A pass rewrites a graph in place and says whether it changed anything. It declares the graph
properties it needs (`requires`) and those it establishes (`ensures`). Properties belong to the graph
they were established on (not to a context shared by several graphs): a freshly loaded or built
graph has none, a copy made with `graph_io.copy_graph` keeps its original's. The manager checks
`requires` on the graph it is given, so a pipeline in the wrong order, or a pass handed a graph
whose shapes were never inferred, fails at once naming the pass.

A PassManager is itself a pass, so pipelines nest. When a pass raises, the manager says which pass,
inside which pipelines, after which passes (a `PassError`; a `UserError` keeps its one-line message
for the user). Timing, node counts and graph dumps are instruments attached to the context (the
pattern of TVM's pass instruments), not code inside the manager.
"""

from __future__ import annotations

import abc
import enum
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Protocol

import onnx_graphsurgeon as gs

from qcompile.errors import UserError

log = logging.getLogger("qcompile.passes")
_PROPERTIES_KEY = "_qcompile_properties"


class GraphProperty(enum.Enum):
    SHAPES_KNOWN = "every tensor has a dtype and shape"
    NODES_NAMED = "every node has a unique name"
    QDQ_PAIRED = "every QuantizeLinear feeds a DequantizeLinear"


def graph_properties(graph: gs.Graph) -> set[GraphProperty]:
    """The properties established on `graph` (a mutable set stored on the graph object)."""
    props = graph.__dict__.get(_PROPERTIES_KEY)
    if props is None:
        props = set()
        graph.__dict__[_PROPERTIES_KEY] = props
    return props


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

    def as_dict(self, *, timing: bool = True) -> dict[str, object]:
        """`timing=False` leaves the seconds out: the manifest must be byte-identical between two runs of
        the same build; timings go to the report."""
        out: dict[str, object] = {"pass": self.name}
        if timing:
            out["seconds"] = round(self.seconds, 4)
        out.update({"nodes_before": self.nodes_before, "nodes_after": self.nodes_after, "modified": self.modified,
                    "detail": self.detail})
        return out


class PassInstrument(Protocol):
    """Watches every pass a manager runs (leaf passes; a nested manager reports its own children)."""

    def before(self, p: Pass, graph: gs.Graph) -> None: ...

    def after(self, p: Pass, graph: gs.Graph, result: PassResult, seconds: float, nodes_before: int) -> None: ...


@dataclass
class PassLog:
    """Instrument: one entry per pass run (time, node-count change, detail), also logged at INFO."""

    entries: list[PassLogEntry] = field(default_factory=list)

    def before(self, p: Pass, graph: gs.Graph) -> None:
        pass

    def after(self, p: Pass, graph: gs.Graph, result: PassResult, seconds: float, nodes_before: int) -> None:
        entry = PassLogEntry(p.name, seconds, nodes_before, len(graph.nodes), result.modified, result.detail)
        self.entries.append(entry)
        log.info("%-28s %7.3fs nodes %5d -> %5d%s", p.name, seconds, nodes_before, len(graph.nodes),
                 f"  ({result.detail})" if result.detail else "")


@dataclass(frozen=True)
class DumpAfter:
    """Instrument: save the graph after each pass named in `names` into `folder` (for debugging)."""

    names: frozenset[str]
    folder: Path

    def before(self, p: Pass, graph: gs.Graph) -> None:
        pass

    def after(self, p: Pass, graph: gs.Graph, result: PassResult, seconds: float, nodes_before: int) -> None:
        if p.name in self.names:
            from qcompile.graph_io import save_graph

            save_graph(graph, self.folder / f"after_{p.name}.onnx")


@dataclass
class PassContext:
    """What a run carries besides the graph: its instruments (by default a pass log). A context may serve
    several graphs; what is true of a graph is stored on the graph (`graph_properties`)."""

    instruments: list[PassInstrument] = field(default_factory=lambda: [PassLog()])

    @property
    def log(self) -> list[PassLogEntry]:
        """The entries of the first PassLog instrument ([] when none is attached)."""
        return next((i.entries for i in self.instruments if isinstance(i, PassLog)), [])


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
    """A pipeline bug: a pass was given a graph without a property it requires."""


class PassError(RuntimeError):
    """A pass raised: names the pass, the pipelines it ran in and the passes before it."""

    def __init__(self, where: str, done: Sequence[str], cause: BaseException):
        before = ", ".join(done[-6:]) or "none"
        more = f"{len(done) - 6} more, " if len(done) > 6 else ""
        super().__init__(f"pass '{where}' failed after [{more}{before}]: {type(cause).__name__}: {cause}")
        self.where = where
        self.done = tuple(done)


class PassManager(Pass):
    """Runs an explicit list of passes once, or repeatedly until none modifies the graph. A manager is
    a pass: it can sit in another manager's list."""

    requires = frozenset()
    ensures = frozenset()

    def __init__(self, passes: Sequence[Pass], *, fixed_point: bool = False, max_iterations: int = 8,
                 name: str = "pipeline"):
        self.passes = tuple(passes)
        self.fixed_point = fixed_point
        self.max_iterations = max_iterations
        self.name = name  # type: ignore[misc]  (an instance's name: pipelines are named where they are built)

    def run(self, graph: gs.Graph, ctx: PassContext | None = None) -> PassResult:
        ctx = ctx if ctx is not None else PassContext()
        any_modified = False
        done: list[str] = []
        for _ in range(self.max_iterations if self.fixed_point else 1):
            round_modified = False
            for p in self.passes:
                round_modified |= self._run_one(p, graph, ctx, done)
                done.append(p.name)
            any_modified |= round_modified
            if not round_modified:
                break
        return PassResult(modified=any_modified)

    def _run_one(self, p: Pass, graph: gs.Graph, ctx: PassContext, done: list[str]) -> bool:
        props = graph_properties(graph)
        missing = p.requires - props
        if missing:
            names = ", ".join(sorted(m.name for m in missing))
            raise PassOrderError(f"pass '{p.name}' in '{self.name}' requires {names}, which the graph it was given "
                                 f"does not have (after [{', '.join(done) or 'none'}])")
        leaf = not isinstance(p, PassManager)
        if leaf:
            for instrument in ctx.instruments:
                instrument.before(p, graph)
        before = len(graph.nodes)
        start = time.perf_counter()
        try:
            result = p.run(graph, ctx)
        except (UserError, PassOrderError, PassError):
            raise
        except Exception as exc:
            raise PassError(f"{self.name}/{p.name}", done, exc) from exc
        seconds = time.perf_counter() - start
        if leaf:  # a nested manager's passes kept the graph's properties up to date themselves
            if result.modified:
                props &= set(p.preserves | p.ensures)
            props |= set(p.ensures)
            for instrument in ctx.instruments:
                instrument.after(p, graph, result, seconds, before)
        return result.modified
