"""DiT's unpatchify (Reshape to 6-D, Transpose, Reshape) as Reshape -> Transpose -> DepthToSpace, all 4-D.

diffusers' transformers turn patch tokens back into an image with
    x[N, h*w, p*p*c] -> Reshape [N, h, w, p, p, c] -> Transpose (0, 5, 1, 3, 2, 4) -> Reshape [N, c, h*p, w*p]
Six-dimensional tensors are beyond what QNN's HTP backend accepts (it leaves the three nodes to the
CPU). The same permutation in 4-D: Reshape [N, h, w, p*p*c] -> Transpose (0, 3, 1, 2) gives channels
ordered (p, q, c), which is exactly DepthToSpace's DCR layout (channel (b1*bs + b2)*C + c goes to
output pixel (h*bs + b1, w*bs + b2) of channel c). Exact; the output keeps its name.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from qcompile.graph_io import constant_values
from qcompile.pass_manager import GraphProperty, Pass, PassContext, PassResult
from qcompile.rewrite import Edit, GraphView, Rule, apply, is_static, producer, require

PASS_NAME = "unpatchify-as-depth-to-space"
UNPATCHIFY_PERM = [0, 5, 1, 3, 2, 4]


@dataclass(frozen=True)
class UnpatchifyMatch:
    first: gs.Node  # Reshape to [N, h, w, p, p, c]
    transpose: gs.Node
    last: gs.Node  # Reshape to [N, c, h*p, w*p]

    @property
    def nodes(self) -> tuple[gs.Node, ...]:
        return (self.first, self.transpose, self.last)


class UnpatchifyRule(Rule[UnpatchifyMatch]):
    name = PASS_NAME
    anchors = frozenset({"Transpose"})

    def match(self, anchor: gs.Node, view: GraphView) -> UnpatchifyMatch:
        require(list(anchor.attrs.get("perm", [])) == UNPATCHIFY_PERM, "not the unpatchify permutation")
        first = producer(anchor.inputs[0])
        last = view.only_consumer(anchor.outputs[0], "Reshape")
        require(first is not None and first.op == "Reshape" and last is not None,
                "the Transpose is not between two Reshapes")
        return UnpatchifyMatch(first, anchor, last)

    def check(self, match: UnpatchifyMatch, view: GraphView) -> str | None:
        six, out = match.first.outputs[0], match.last.outputs[0]
        if not view.single_use(six):
            return "the 6-D patches are read elsewhere"
        if six.shape is None or len(six.shape) != 6 or out.shape is None or len(out.shape) != 4 or \
                not is_static((*six.shape, *out.shape)):
            return "the shapes are not static 6-D patches and a 4-D image"
        n, h, w, p, q, c = six.shape
        if p != q or list(out.shape) != [n, c, h * p, w * q] or constant_values(match.first.inputs[1]) is None:
            return "the Reshapes are not an unpatchify of square patches"
        return None

    def rewrite(self, match: UnpatchifyMatch, edit: Edit) -> None:
        n, h, w, p, q, c = match.first.outputs[0].shape
        base = match.first.name
        flat = gs.Variable(f"{base}_patches", np.float32, [n, h, w, p * q * c])
        nchw = gs.Variable(f"{base}_patches_nchw", np.float32, [n, p * q * c, h, w])
        shape = gs.Constant(f"{base}_patch_shape", np.array([n, h, w, p * q * c], np.int64))
        edit.add("Reshape", f"{base}_to_patches", [match.first.inputs[0], shape], [flat], like=match.transpose)
        edit.add("Transpose", f"{base}_to_nchw", [flat], [nchw], {"perm": [0, 3, 1, 2]}, like=match.transpose)
        edit.add("DepthToSpace", f"{base}_depth_to_space", [nchw], [match.last.outputs[0]],
                 {"blocksize": p, "mode": "DCR"}, like=match.transpose)


class UnpatchifyAsDepthToSpace(Pass):
    name = PASS_NAME
    requires = frozenset({GraphProperty.SHAPES_KNOWN})
    preserves = frozenset({GraphProperty.NODES_NAMED, GraphProperty.SHAPES_KNOWN})

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        report = apply(graph, [UnpatchifyRule()])
        return PassResult(modified=bool(report.matches),
                          detail=report.detail(f"{len(report.matches)} unpatchify as DepthToSpace"))
