"""A one-input Einsum that only permutes axes ('nhwpqc->nchpwq', DiT's unpatchify) as a Transpose.

Exporters keep torch.einsum as ONNX Einsum; QNN's HTP backend does not take Einsum (the EP leaves it
to the CPU), while Transpose is a plain data-movement op every target runs, quantized or not.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_graphsurgeon as gs

from qcompile.pass_manager import GraphProperty, Pass, PassContext, PassResult
from qcompile.rewrite import Edit, GraphView, Rule, apply, require

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


@dataclass(frozen=True)
class EinsumMatch:
    einsum: gs.Node
    perm: list[int] | None

    @property
    def nodes(self) -> tuple[gs.Node, ...]:
        return (self.einsum,)


class EinsumRule(Rule[EinsumMatch]):
    name = PASS_NAME
    anchors = frozenset({"Einsum"})

    def match(self, anchor: gs.Node, view: GraphView) -> EinsumMatch:
        require(len(anchor.inputs) == 1, "the Einsum has several operands")
        return EinsumMatch(anchor, permutation(str(anchor.attrs.get("equation", ""))))

    def check(self, match: EinsumMatch, view: GraphView) -> str | None:
        return "the equation is not a pure permutation" if match.perm is None else None

    def rewrite(self, match: EinsumMatch, edit: Edit) -> None:
        node = match.einsum
        edit.add("Transpose", node.name, [node.inputs[0]], [node.outputs[0]], {"perm": match.perm}, like=node)


class EinsumAsTranspose(Pass):
    name = PASS_NAME
    preserves = frozenset({GraphProperty.NODES_NAMED, GraphProperty.SHAPES_KNOWN, GraphProperty.QDQ_PAIRED})

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        report = apply(graph, [EinsumRule()])
        return PassResult(modified=bool(report.matches),
                          detail=report.detail(f"{len(report.matches)} Einsum as Transpose"))
