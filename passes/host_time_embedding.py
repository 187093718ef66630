"""Move the timestep embedding out of the device graph: the host computes it in float and feeds it in.

Everything that depends only on the timestep (the sinusoidal projection, the time MLP, each resnet's
`time_emb_proj`) is the same for every sample at a given step, costs a few small GEMVs, and is the
worst thing to run in integer: the Sin/Cos argument spans 0..1000 (cosine 0.82 at 8 bits on the QNN
simulator) and its ranges move most across timesteps. This pass finds that subgraph, cuts it out into
a separate float graph (`host_graph`, timestep in, embeddings out) and turns the tensors where it met
the rest of the network into inputs of the device graph, under their original names, so calibration
statistics recorded on the canonical graph still apply to them.

Other per-sample scalars (Flux's guidance strength, embedded exactly like the timestep: its Sin/Cos
had -1.5 dB SQNR at 16 bits on the device) move with it. Inputs without a batch axis (Flux's image
and text token ids) are the same for every sample: the
rotary embedding computed from them (float64 cos/sin, then Expand, which HTP does not take) moves
with the timestep's subgraph.

Integer inputs (class labels) are categorical conditioning of the same kind: their embedding lookups
and everything computed from them and the timestep alone (DiT's adaLN modulation) move too, since an
integer index cannot be quantized and HTP mishandles the Gather on it (tiny DiT: the graph fails to
finalize with QNN_COMMON_ERROR_MEM_ALLOC until the second block's label embedding leaves it).

Two cuts:
- `FULL`: every node whose only non-constant input chain starts at the timestep (the default; the
  device graph then starts at the per-resnet time projections);
- `SINUSOID`: stop before the first weighted op (Gemm/MatMul/Conv), so the time MLP stays on the device
  and only the parameter-free projection moves to the host.
Any target can use it; the target ships `host_graph` next to its device model and its runner runs it.
"""

from __future__ import annotations

import enum

import numpy as np
import onnx_graphsurgeon as gs

from qcompile.caps import WEIGHTED_OPS
from qcompile.errors import UserError
from qcompile.graph_io import constant_values, node_meta
from qcompile.pass_manager import GraphProperty, Pass, PassContext, PassResult
from qcompile.passes.static_shapes import StaticShapes

PASS_NAME = "host-time-embedding"


class TimeEmbeddingCut(enum.Enum):
    FULL = "full"
    SINUSOID = "sinusoid"
    NONE = "none"  # leave everything on the device (for measuring what the cut is worth)


def _is_integer(t: gs.Tensor) -> bool:
    return t.dtype is not None and np.issubdtype(np.dtype(t.dtype), np.integer)


def integer_inputs(graph: gs.Graph) -> list[str]:
    return [t.name for t in graph.inputs if _is_integer(t)]


def scalar_inputs(graph: gs.Graph) -> list[str]:
    """Float inputs holding one number per sample (rank 1): the timestep and its kind (Flux's guidance)."""
    return [t.name for t in graph.inputs if not _is_integer(t) and t.shape is not None and len(t.shape) == 1]


def _reads_only(node: gs.Node, reached: set[str]) -> bool:
    """Whether `node` reads at least one of the `reached` tensors and, besides them, only constants."""
    variables = [t for t in node.inputs if t.name and constant_values(t) is None]
    return bool(variables) and all(t.name in reached for t in variables)


def lookup_nodes(graph: gs.Graph, sources: set[str]) -> list[gs.Node]:
    """Without a timestep (a text encoder): the integer arithmetic on the integer inputs and the
    lookups they index (a Gather on a constant table), whose float outputs the device then reads. What
    the lookups feed stays on the device: in a text encoder everything else depends on the ids alone."""
    reached = set(sources)
    chosen: list[gs.Node] = []
    for node in graph.nodes:
        if not _reads_only(node, reached):
            continue
        lookup = node.op == "Gather" and constant_values(node.inputs[0]) is not None
        integer = all(_is_integer(t) for t in node.outputs)
        if not (lookup or integer):
            continue
        chosen.append(node)
        if not lookup:
            reached.update(t.name for t in node.outputs)
    return chosen


def timestep_only_nodes(graph: gs.Graph, sources: set[str], cut: TimeEmbeddingCut) -> list[gs.Node]:
    """Nodes (graph order) computing from the `sources` inputs (timestep, labels) and constants alone."""
    reached = set(sources)
    chosen: list[gs.Node] = []
    for node in graph.nodes:  # graph order is topological
        if not _reads_only(node, reached):
            continue
        if cut is TimeEmbeddingCut.SINUSOID and node.op in WEIGHTED_OPS:
            continue
        chosen.append(node)
        reached.update(t.name for t in node.outputs)
    return chosen


class MoveTimeEmbeddingToHost(Pass):
    name = PASS_NAME
    preserves = frozenset({GraphProperty.NODES_NAMED, GraphProperty.SHAPES_KNOWN, GraphProperty.QDQ_PAIRED})

    def __init__(self, timestep: str | None, cut: TimeEmbeddingCut = TimeEmbeddingCut.FULL,
                 static_shapes: StaticShapes | None = None):
        """`timestep` None: only the integer inputs' lookups move (`lookup_nodes`). `static_shapes`: the
        pass that fixed the batch before this one (the pipeline is built before any graph exists, so
        what it found is read when this pass runs); the inputs it found without a batch axis (Flux's
        token ids) are sources too, so the rotary embedding computed from them moves to the host."""
        self.timestep = timestep
        self.cut = cut
        self.static_shapes = static_shapes
        self.host_graph: gs.Graph | None = None  # set by run()

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        inputs = {t.name: t for t in graph.inputs}
        if self.timestep is not None and self.timestep not in inputs:
            raise UserError(f"{PASS_NAME}: the graph has no input '{self.timestep}'")
        if self.cut is TimeEmbeddingCut.NONE:
            self.host_graph = None
            return PassResult(modified=False, detail="cut disabled")
        if self.timestep is None:
            sources = set(integer_inputs(graph))
            host = lookup_nodes(graph, sources)
        else:
            unbatched = set(self.static_shapes.unbatched if self.static_shapes is not None else ())
            if unbatched >= set(inputs):
                unbatched = set()  # exported without any batch axis: nothing tells positions apart
            sources = {self.timestep, *integer_inputs(graph), *scalar_inputs(graph), *unbatched}
            host = timestep_only_nodes(graph, sources, self.cut)
        host_ids = {id(n) for n in host}
        graph_outputs = {t.name for t in graph.outputs}
        frontier: dict[str, gs.Variable] = {}
        for node in host:
            for t in node.outputs:
                if t.name in graph_outputs:
                    raise UserError(f"{PASS_NAME}: graph output '{t.name}' depends on the timestep alone")
                if any(id(c) not in host_ids for c in t.outputs):
                    frontier[t.name] = t
        if not frontier:
            self.host_graph = None
            return PassResult(modified=False, detail="no timestep-only subgraph")
        used = {t.name for n in host for t in n.inputs}
        host_inputs = [inputs[name] for name in inputs if name in sources and name in used]
        self.host_graph = _copy_subgraph(host, host_inputs, list(frontier), graph.opset)
        for tensor in frontier.values():  # device side: the cut tensors become graph inputs
            tensor.inputs.clear()
        keep = [t for t in graph.inputs if t.name not in sources or any(id(c) not in host_ids for c in t.outputs)]
        graph.inputs = keep + list(frontier.values())
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(modified=True, detail=f"{len(host)} nodes to the host ({self.cut.value}), "
                                                f"{len(frontier)} embedding inputs")


def _copy_subgraph(nodes: list[gs.Node], sources: list[gs.Tensor], outputs: list[str], opset: int) -> gs.Graph:
    """A separate graph of fresh nodes and tensors (constants share their lazy values, not their
    objects), so nothing of it shows up as a consumer in the device graph."""
    own: dict[str, gs.Tensor] = {t.name: gs.Variable(t.name, t.dtype, t.shape) for t in sources}

    def mine(t: gs.Tensor) -> gs.Tensor:
        if t.name and t.name not in own:
            own[t.name] = (gs.Constant(t.name, t._values, data_location=t.data_location)
                           if isinstance(t, gs.Constant) else gs.Variable(t.name, t.dtype, t.shape))
        return own[t.name] if t.name else gs.Variable.empty()

    copies = []
    for node in nodes:
        ins = [mine(t) for t in node.inputs]
        outs = [mine(t) for t in node.outputs]
        copy = gs.Node(node.op, node.name, dict(node.attrs), ins, outs, domain=node.domain)
        node_meta(copy).update(node_meta(node))
        copies.append(copy)
    return gs.Graph(nodes=copies, inputs=[own[t.name] for t in sources], outputs=[own[n] for n in outputs], opset=opset,
                    name="host_time_embedding")
