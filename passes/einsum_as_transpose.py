"""A one-input Einsum that only permutes axes ('nhwpqc->nchpwq', DiT's unpatchify) as a Transpose.

Exporters keep torch.einsum as ONNX Einsum; QNN's HTP backend does not take Einsum (the EP leaves it
to the CPU), while Transpose is a plain data-movement op every target runs, quantized or not.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from qcompile.graph_io import tag_new_node
from qcompile.pass_manager import GraphProperty, Pass, PassContext, PassResult

PASS_NAME = "einsum-as-transpose"


def permutation(equation: str) -> list[int] | None:
    """The Transpose perm for 'abc->cab'-style equations; None for anything that is not a pure permutation."""
    equation = equation.replace(" ", "")
    if "->" not in equation or "," in equation or "." in equation:
        return None
    src, dst = equation.split("->")
    if len(set(src)) != len(src) or sorted(src) != sorted(dst):
        return None
    return [src.index(c) for c in dst]


class EinsumAsTranspose(Pass):
    name = PASS_NAME
    preserves = frozenset({GraphProperty.NODES_NAMED, GraphProperty.SHAPES_KNOWN, GraphProperty.QDQ_PAIRED})

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        count = 0
        for node in list(graph.nodes):
            if node.op != "Einsum" or len(node.inputs) != 1:
                continue
            perm = permutation(str(node.attrs.get("equation", "")))
            if perm is None:
                continue
            transpose = gs.Node("Transpose", node.name, {"perm": perm}, [node.inputs[0]], [node.outputs[0]])
            node.inputs.clear()
            node.outputs.clear()
            graph.nodes.append(tag_new_node(transpose, PASS_NAME, like=node))
            count += 1
        if count:
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(modified=bool(count), detail=f"{count} Einsum as Transpose")
