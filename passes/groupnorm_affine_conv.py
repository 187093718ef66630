"""GroupNorm's per-channel affine (Mul gamma, Add beta) as one depthwise 1x1 Conv.

Why: on the QNN HTP backend (onnxruntime-qnn 2.7.0, QNN 2.51 simulator) the quantized
`Mul(x, gamma[C,1,1])` after a GroupNorm's InstanceNormalization collapses its output to the zero
point in some up-blocks and reads stale data from earlier inferences (outputs change run to run);
the ONNX GroupNormalization operator in Q/DQ form is rejected by the EP altogether. The same affine
written as Conv(x, W[C,1,1,1] = gamma, B = beta, group = C) runs correctly and bit-identically on
HTP, and gives the weights per-channel int8 scales, which a per-tensor Mul constant cannot have.
Measured here on a 9-node repro (`tests/graphs.py: groupnorm_skip_model`) at 16-bit activations:
with the affine's constants quantized to 16 bits, HTP's output has cosine 0.11 (CPU EP 1.0000 on the
same Q/DQ graph) and the first tensor to break is the SiLU product after the affine; with 8-bit
constants (what the QNN caps now use) or this Conv form, HTP agrees. The Conv form stays the default:
it keeps HTP away from the pattern the issue saw collapse in full UNets and it is more precise.
Numerically it is the same function in float; the output keeps the name of the unit's last node.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from qcompile.graph_io import tag_new_node
from qcompile.pass_manager import GraphProperty, Pass, PassContext, PassResult
from qcompile.passes.fuse_groupnorm import _affine, find_groupnorm

PASS_NAME = "groupnorm-affine-as-conv"


class GroupNormAffineAsConv(Pass):
    name = PASS_NAME
    requires = frozenset({GraphProperty.SHAPES_KNOWN})
    preserves = frozenset({GraphProperty.NODES_NAMED, GraphProperty.SHAPES_KNOWN})

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        nodes = {n.name: n for n in graph.nodes}
        count = 0
        for unit in find_groupnorm(graph):
            if not unit.gamma and not unit.beta:
                continue  # affine=False: nothing to rewrite
            x_rank = len(nodes[unit.reshape_in].inputs[0].shape)
            if x_rank != 4:
                continue  # Conv is 2-D here; other ranks keep the elementwise form
            first = nodes[unit.gamma or unit.beta]
            last = nodes[unit.beta or unit.gamma]
            x = nodes[unit.reshape_out].outputs[0]
            y = last.outputs[0]
            gamma = _affine(nodes.get(unit.gamma), unit.channels, x_rank, 1.0)
            beta = _affine(nodes.get(unit.beta), unit.channels, x_rank, 0.0)
            conv = gs.Node("Conv", f"{last.name}_depthwise", {"group": unit.channels, "kernel_shape": [1, 1]},
                           [x, gs.Constant(f"{last.name}_gamma_weight", gamma.reshape(unit.channels, 1, 1, 1)),
                            gs.Constant(f"{last.name}_beta_bias", beta)], [y])
            last.outputs.clear()  # cleanup drops the Mul/Add; y keeps its name and consumers
            graph.nodes.append(tag_new_node(conv, PASS_NAME, like=first))
            count += 1
        if count:
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(modified=bool(count), detail=f"{count} GroupNorm affines as depthwise Conv")

