"""Q-Diffusion's shortcut split: a Conv reading Concat(deep, skip) becomes one Conv per part, summed.

In a UNet up block, the decoder feature and the encoder's skip feature are concatenated along
channels before the resnet. Their ranges differ by up to an order of magnitude (Li et al.,
"Q-Diffusion", 2023, section 4.3), so a single activation scale on the concatenation loses the
smaller one. Splitting the consuming Conv's weight along input channels,
    Conv(Concat(a, b), [Wa | Wb], bias) = Conv(a, Wa, bias) + Conv(b, Wb)
is exact in float and gives each part its own activation scale (and its own weight scales).
The Concat stays for its other readers (in diffusers' ResnetBlock2D, norm1 reads it; the
conv_shortcut is the Conv that reads it directly; conv1 reads norm1's SiLU).
Grouped convolutions are left alone (a group may straddle the split).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from qcompile.graph_io import constant_values, tag_new_node
from qcompile.pass_manager import GraphProperty, Pass, PassContext, PassResult
from qcompile.rewrite import producer


class SplitShortcutConcat(Pass):
    name = "split-shortcut-concat"
    requires = frozenset({GraphProperty.NODES_NAMED, GraphProperty.SHAPES_KNOWN})
    preserves = frozenset({GraphProperty.NODES_NAMED, GraphProperty.SHAPES_KNOWN, GraphProperty.QDQ_PAIRED})

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        names = {n.name for n in graph.nodes}
        split = 0
        for conv in list(graph.nodes):
            parts = _concat_parts(conv)
            if parts is not None:
                self._split(graph, conv, parts, names)
                split += 1
        if split:
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(modified=bool(split), detail=f"{split} convs split")

    def _split(self, graph: gs.Graph, conv: gs.Node, parts: list[tuple[gs.Tensor, int]], names: set[str]) -> None:
        weight = np.asarray(constant_values(conv.inputs[1]))
        bias = conv.inputs[2] if len(conv.inputs) > 2 and conv.inputs[2].name else None
        y = conv.outputs[0]
        start, partial = 0, []
        for i, (tensor, channels) in enumerate(parts):
            inputs = [tensor, gs.Constant(f"{conv.name}_weight_split{i}",
                                          np.ascontiguousarray(weight[:, start:start + channels]))]
            if i == 0 and bias is not None:
                inputs.append(bias)
            out = gs.Variable(f"{y.name}_split{i}", y.dtype, y.shape)
            graph.nodes.append(tag_new_node(gs.Node("Conv", _unique(f"{conv.name}_split{i}", names),
                                                    dict(conv.attrs), inputs, [out]), self.name, like=conv))
            partial.append(out)
            start += channels
        total = partial[0]
        for i, part in enumerate(partial[1:], start=1):
            last = i == len(partial) - 1
            out = y if last else gs.Variable(f"{y.name}_sum{i}", y.dtype, y.shape)
            graph.nodes.append(tag_new_node(gs.Node("Add", _unique(f"{conv.name}_sum{i}", names), {},
                                                    [total, part], [out]), self.name, like=conv))
            total = out
        conv.outputs.clear()


def _unique(name: str, names: set[str]) -> str:
    while name in names:
        name += "_"
    names.add(name)
    return name


def _concat_parts(conv: gs.Node) -> list[tuple[gs.Tensor, int]] | None:
    """(input, channel count) of the channel Concat a plain Conv reads, or None when it does not apply."""
    if conv.op != "Conv" or conv.attrs.get("group", 1) != 1 or len(conv.inputs) < 2:
        return None
    data = conv.inputs[0]
    concat = producer(data)
    if concat is None or concat.op != "Concat" or len(concat.inputs) < 2:
        return None
    weight = constant_values(conv.inputs[1])
    rank = len(data.shape) if data.shape is not None else None
    if weight is None or rank is None or concat.attrs.get("axis") not in (1, 1 - rank):
        return None
    parts = []
    for t in concat.inputs:
        if t.shape is None or not isinstance(t.shape[1], int) or constant_values(t) is not None:
            return None
        if t.shape[1] <= 0:
            return None
        parts.append((t, t.shape[1]))
    if sum(c for _, c in parts) != weight.shape[1]:
        return None
    return parts
