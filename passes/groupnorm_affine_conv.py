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

from qcompile.pass_manager import GraphProperty, Pass, PassContext, PassResult
from qcompile.passes.fuse_groupnorm import GroupNormMatch, GroupNormPattern
from qcompile.rewrite import Edit, GraphView, Rule, apply

PASS_NAME = "groupnorm-affine-as-conv"


class AffineAsConv(GroupNormPattern, Rule[GroupNormMatch]):
    """The Mul/Add after a decomposed GroupNorm as one Conv(W = gamma, B = beta, group = C)."""

    name = PASS_NAME

    def check(self, match: GroupNormMatch, view: GraphView) -> str | None:
        if match.role("gamma") is None and match.role("beta") is None:
            return "the GroupNorm has no affine"
        if len(match.x.shape) != 4:
            return "the GroupNorm input is not 4-D (Conv is 2-D here)"
        return None

    def rewrite(self, match: GroupNormMatch, edit: Edit) -> None:
        first = match.role("gamma") or match.role("beta")
        last = match.last
        c = match.channels
        weight = gs.Constant(f"{last.name}_gamma_weight", match.gamma.reshape(c, 1, 1, 1))
        bias = gs.Constant(f"{last.name}_beta_bias", match.beta)
        edit.add("Conv", f"{last.name}_depthwise", [match.role("reshape_out").outputs[0], weight, bias],
                 [last.outputs[0]], {"group": c, "kernel_shape": [1, 1]}, like=first)


class GroupNormAffineAsConv(Pass):
    name = PASS_NAME
    requires = frozenset({GraphProperty.SHAPES_KNOWN})
    preserves = frozenset({GraphProperty.NODES_NAMED, GraphProperty.SHAPES_KNOWN})

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        report = apply(graph, [AffineAsConv()])
        return PassResult(modified=bool(report.matches),
                          detail=report.detail(f"{len(report.matches)} GroupNorm affines as depthwise Conv"))
