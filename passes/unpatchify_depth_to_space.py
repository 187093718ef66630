"""DiT's unpatchify (Reshape to 6-D, Transpose, Reshape) as Reshape -> Transpose -> DepthToSpace, all 4-D.

diffusers' transformers turn patch tokens back into an image with
    x[N, h*w, p*p*c] -> Reshape [N, h, w, p, p, c] -> Transpose (0, 5, 1, 3, 2, 4) -> Reshape [N, c, h*p, w*p]
Six-dimensional tensors are beyond what QNN's HTP backend accepts (it leaves the three nodes to the
CPU). The same permutation in 4-D: Reshape [N, h, w, p*p*c] -> Transpose (0, 3, 1, 2) gives channels
ordered (p, q, c), which is exactly DepthToSpace's DCR layout (channel (b1*bs + b2)*C + c goes to
output pixel (h*bs + b1, w*bs + b2) of channel c). Exact; the output keeps its name.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from qcompile.graph_io import constant_values, tag_new_node
from qcompile.pass_manager import GraphProperty, Pass, PassContext, PassResult

PASS_NAME = "unpatchify-as-depth-to-space"
UNPATCHIFY_PERM = [0, 5, 1, 3, 2, 4]


def _single_consumer(t: gs.Tensor) -> gs.Node | None:
    return t.outputs[0] if len(t.outputs) == 1 else None


class UnpatchifyAsDepthToSpace(Pass):
    name = PASS_NAME
    requires = frozenset({GraphProperty.SHAPES_KNOWN})
    preserves = frozenset({GraphProperty.NODES_NAMED, GraphProperty.SHAPES_KNOWN})

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        outputs = {t.name for t in graph.outputs}
        count = 0
        for first in list(graph.nodes):
            if first.op != "Reshape" or not first.outputs or first.outputs[0].name in outputs:
                continue
            six = first.outputs[0]
            transpose = _single_consumer(six)
            if transpose is None or transpose.op != "Transpose" or list(transpose.attrs.get("perm", [])) != \
                    UNPATCHIFY_PERM or transpose.outputs[0].name in outputs:
                continue
            last = _single_consumer(transpose.outputs[0])
            if last is None or last.op != "Reshape":
                continue
            shape, out_shape = six.shape, last.outputs[0].shape
            if shape is None or len(shape) != 6 or out_shape is None or len(out_shape) != 4 or \
                    not all(isinstance(d, int) for d in (*shape, *out_shape)):
                continue
            n, h, w, p, q, c = shape
            if p != q or list(out_shape) != [n, c, h * p, w * q] or constant_values(first.inputs[1]) is None:
                continue
            base = first.name
            flat = gs.Variable(f"{base}_patches", np.float32, [n, h, w, p * q * c])
            nchw = gs.Variable(f"{base}_patches_nchw", np.float32, [n, p * q * c, h, w])
            y = last.outputs[0]
            new = [
                gs.Node("Reshape", f"{base}_to_patches", {},
                        [first.inputs[0], gs.Constant(f"{base}_patch_shape", np.array([n, h, w, p * q * c], np.int64))],
                        [flat]),
                gs.Node("Transpose", f"{base}_to_nchw", {"perm": [0, 3, 1, 2]}, [flat], [nchw]),
                gs.Node("DepthToSpace", f"{base}_depth_to_space", {"blocksize": p, "mode": "DCR"}, [nchw], [y]),
            ]
            last.outputs.clear()
            graph.nodes.extend(tag_new_node(node, PASS_NAME, like=transpose) for node in new)
            count += 1
        if count:
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(modified=bool(count), detail=f"{count} unpatchify as DepthToSpace")
