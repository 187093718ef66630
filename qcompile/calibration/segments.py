"""A float model cut into consecutive segments, run one after another so each tensor is computed once.

The statistics pass must see every quantizable tensor. Exposing them all as outputs of the whole
model would hold every activation of a batch at once (gigabytes for an SD-size UNet); exposing them a
group at a time replays the whole model once per group. Cutting the graph into segments (runs of
nodes in topological order) does neither: a segment's outputs are the observed tensors it computes
plus the tensors later segments read, so one forward pass per batch yields every statistic while at
most one segment's observed outputs and the tensors crossing the current cut are alive.

Segments are written beside the model as small protobufs whose initializers still point into the
model's own external data file: the weights are not copied, on disk or per segment.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from qcompile.runtime import make_session


@dataclass(frozen=True)
class Segment:
    nodes: tuple[onnx.NodeProto, ...]
    inputs: tuple[str, ...]  # tensors it reads that an earlier segment or the feed produced
    observed: tuple[str, ...]  # tensors it computes that the caller observes
    carried: tuple[str, ...]  # tensors it computes that later segments read (observed ones included)
    release: tuple[str, ...]  # tensors alive before it that nothing after it reads

    @property
    def outputs(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.observed + self.carried))


def subgraph_reads(node: onnx.NodeProto) -> set[str]:
    """Outer-scope tensors read inside a node's subgraphs (If/Loop/Scan bodies)."""
    names: set[str] = set()
    for attr in node.attribute:
        for g in [attr.g] if attr.HasField("g") else list(attr.graphs):
            local = {i.name for i in g.initializer} | {i.name for i in g.input}
            for inner in g.node:
                local.update(inner.output)
            for inner in g.node:
                names.update(n for n in inner.input if n and n not in local)
                names.update(subgraph_reads(inner) - local)
    return names


def node_reads(node: onnx.NodeProto) -> set[str]:
    return {n for n in node.input if n} | subgraph_reads(node)


def plan_segments(graph: onnx.GraphProto, observed: Sequence[str], cost: Callable[[str], int],
                  budget: int) -> list[Segment]:
    """Cut `graph`'s nodes (in their topological order) so that the `cost` of the observed tensors each
    segment computes stays within `budget` (a segment holds at least one node).

    A cut must not change what onnxruntime computes. Two things would: a constant turned into an input
    (it could no longer be folded), and a scale or transpose feeding a MatMul in another segment
    (onnxruntime folds those into the MatMul, `FusedMatMul(alpha, transB)`, which rounds differently
    from multiplying first). So each segment gets its own copy of the Constant nodes it reads, and
    recomputes such a producer (cheap, weightless) from the producer's own input."""
    wanted = set(observed)
    constants = {o: n for n in graph.node if n.op_type == "Constant" for o in n.output}
    nodes = [n for n in graph.node if n.op_type != "Constant"]
    chunks: list[list[onnx.NodeProto]] = [[]]
    used = 0
    for node in nodes:
        size = sum(cost(o) for o in node.output if o in wanted)
        if chunks[-1] and used + size > budget:
            chunks.append([])
            used = 0
        chunks[-1].append(node)
        used += size
    chunks = [c for c in chunks if c]
    fixed = {i.name for i in graph.initializer} | set(constants)
    producer = {o: n for n in nodes for o in n.output if o}
    position = {id(n): i for i, n in enumerate(nodes)}
    copies = [_refolded(chunk, producer, fixed, position) for chunk in chunks]
    # Last segment reading each tensor; graph outputs are never read, observed ones leave where made.
    last_read: dict[str, int] = {}
    reads_of, made_of = [], []
    for k, chunk in enumerate(chunks):
        made = {o for node in [*copies[k], *chunk] for o in node.output if o}
        reads = {r for node in [*copies[k], *chunk] for r in node_reads(node)}
        reads_of.append(reads)
        made_of.append([o for node in chunk for o in node.output if o])
        for name in reads - made - fixed:
            last_read[name] = k
    feed_observed = [i.name for i in graph.input if i.name in wanted]
    segments, alive = [], {i.name for i in graph.input if i.name not in fixed}
    for k, chunk in enumerate(chunks):
        made, reads = made_of[k], reads_of[k]
        local = set(made) | {o for node in copies[k] for o in node.output}
        inputs = tuple(sorted(reads - local - fixed))
        own = [constants[r] for r in sorted(reads & set(constants))]
        observed_here = [o for o in made if o in wanted] + (feed_observed if k == 0 else [])
        carried = [o for o in made if last_read.get(o, -1) > k]
        release = tuple(sorted(n for n in alive if last_read.get(n, -1) <= k))
        alive = (alive - set(release)) | set(carried)
        segments.append(Segment(tuple(own) + tuple(copies[k]) + tuple(chunk), inputs, tuple(observed_here),
                                tuple(carried), release))
    return segments


# Producers onnxruntime folds into a MatMul/Gemm that reads them (MatMulScaleFusion, MatMulTransposeFusion).
FOLDED_INTO_MATMUL = frozenset({"Mul", "Div", "Transpose"})


def _refolded(chunk: list[onnx.NodeProto], producer: dict[str, onnx.NodeProto], fixed: set[str],
              position: dict[int, int]) -> list[onnx.NodeProto]:
    """Copies of the producers, outside `chunk`, of what its MatMul/Gemm nodes read that onnxruntime
    would fold into them (followed through chains of such producers), in topological order."""
    local = {o for node in chunk for o in node.output}
    found: dict[str, onnx.NodeProto] = {}
    todo = [(r, 0) for node in chunk if node.op_type in ("MatMul", "Gemm") for r in node.input if r]
    while todo:
        name, depth = todo.pop()
        node = producer.get(name)
        if name in local or name in found or node is None or node.op_type not in FOLDED_INTO_MATMUL or depth > 3:
            continue
        live = [i for i in node.input if i and i not in fixed]
        if len(live) != 1:
            continue
        found[name] = node
        todo.append((live[0], depth + 1))
    unique = {id(n): n for n in found.values()}
    return sorted(unique.values(), key=lambda n: position[id(n)])


def segment_model(model: onnx.ModelProto, segment: Segment, value_info: dict[str, onnx.ValueInfoProto],
                  feed_observed: Sequence[str]) -> onnx.ModelProto:
    """A model of the segment's nodes: its initializers are those of `model` it reads (still
    referencing the external data file), its inputs the tensors crossing the cut."""
    reads = {r for node in segment.nodes for r in node_reads(node)}
    inits = [i for i in model.graph.initializer if i.name in reads]
    outputs = [n for n in segment.outputs if n not in feed_observed]
    graph = onnx.helper.make_graph(
        list(segment.nodes), f"{model.graph.name}_segment",
        [_info(n, value_info) for n in segment.inputs], [_info(n, value_info) for n in outputs], inits,
        value_info=[value_info[n] for node in segment.nodes for n in node.output if n in value_info
                    and n not in outputs],
    )
    out = onnx.helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
    out.functions.extend(model.functions)
    return out


def _info(name: str, value_info: dict[str, onnx.ValueInfoProto]) -> onnx.ValueInfoProto:
    if name in value_info:
        return value_info[name]
    # Unknown type and shape: onnxruntime infers it from the feed (inputs) or the producing node (outputs).
    info = onnx.ValueInfoProto()
    info.name = name
    return info


class SegmentedModel:
    """Sessions over the segments of one model file; `run` yields each segment's observed outputs."""

    def __init__(self, segments: list[Segment], sessions: list[ort.InferenceSession], feed_observed: Sequence[str]):
        self.segments = segments
        self.sessions = sessions
        self.feed_observed = tuple(feed_observed)

    def run(self, feed: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        """Per segment, {observed name: value}; each value is released once the caller moves on and no
        later segment reads it."""
        live = dict(feed)
        for k, (seg, sess) in enumerate(zip(self.segments, self.sessions, strict=True)):
            names = [n for n in seg.outputs if n not in self.feed_observed]
            values = dict(zip(names, sess.run(names, {n: live[n] for n in seg.inputs}), strict=True)) if names \
                else {}
            if k == 0:
                values.update({n: live[n] for n in self.feed_observed})
            yield {n: values[n] for n in seg.observed}
            for n in seg.release:
                live.pop(n, None)
            live.update({n: values[n] for n in seg.carried})
            del values


@contextmanager
def segmented(onnx_path: Path, observed: Sequence[str], cost: Callable[[str], int], budget: int
              ) -> Iterator[SegmentedModel]:
    """Open sessions on `onnx_path` cut into segments (see `plan_segments`). The segment files live
    beside the model only while their sessions are made."""
    onnx_path = Path(onnx_path)
    model = onnx.load(str(onnx_path), load_external_data=False)
    value_info = {v.name: v for v in [*model.graph.value_info, *model.graph.input, *model.graph.output]}
    segments = plan_segments(model.graph, observed, cost, budget)
    feed_observed = [i.name for i in model.graph.input if i.name in set(observed)]
    sessions = []
    for k, seg in enumerate(segments):
        path = onnx_path.with_name(f".{onnx_path.stem}.segment{k}.onnx")
        onnx.save_model(segment_model(model, seg, value_info, feed_observed), str(path))
        try:
            sessions.append(make_session(path, arena=False))
        finally:
            path.unlink()
    del model
    yield SegmentedModel(segments, sessions, feed_observed)
