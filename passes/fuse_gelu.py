"""Decomposed GELU -> one ONNX `Gelu` node (opset 20), exact (erf) or tanh approximation.

Forms matched, with any association and operand order of the final product:
    erf:  x * 0.5 * (1 + Erf(x / sqrt(2)))          (or Erf(x * 0.70710678))
    tanh: x * 0.5 * (1 + Tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))   (x^3 as Pow(x, 3) or x*x*x)
Why fuse: quantizing the decomposed form puts Q/DQ on Erf/Tanh intermediates whose ranges say nothing
about the activation; as one op the targets use their GELU kernel (or a LUT) and quantize only its
input and output (TensorRT places its Q/DQ around the fused op). The product is recognised by
flattening the Mul tree above `1 + erf(.)` into its leaves, which must be exactly {x, 1 + erf(.),
constants multiplying to 0.5}: a Mul by anything else (GEGLU's `hidden * gelu(gate)`) ends the
search before it.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from qcompile.graph_io import constant_values
from qcompile.pass_manager import GraphProperty, Pass, PassContext, PassResult
from qcompile.rewrite import (
    Edit,
    GraphView,
    NoMatch,
    Rule,
    apply,
    is_scalar,
    producer,
    reader,
    require,
    subgraph,
)

MIN_OPSET = 20
# Exporters and hand-written graphs round these constants differently.
CONST_RTOL = 1e-4
CUBIC = 0.044715
MAX_PRODUCT_STEPS = 3


class GeluForm(enum.Enum):
    ERF = "none"  # the values are ONNX Gelu's `approximate` attribute
    TANH = "tanh"


@dataclass(frozen=True)
class GeluMatch:
    form: GeluForm
    x: gs.Tensor
    end: gs.Node  # the Mul completing the product; the Gelu takes its output
    nodes: tuple[gs.Node, ...]


class GeluRule(Rule[GeluMatch]):
    name = "fuse-gelu"
    anchors = frozenset({"Erf", "Tanh"})

    def match(self, anchor: gs.Node, view: GraphView) -> GeluMatch:
        if anchor.op == "Erf":
            form, x = GeluForm.ERF, _erf_input(anchor)
        else:
            form, x = GeluForm.TANH, _tanh_input(anchor, view)
        end = _product_end(anchor, x, view)
        return GeluMatch(form, x, end, subgraph([x], end.outputs))

    def check(self, match: GeluMatch, view: GraphView) -> str | None:
        if view.escaping(match.nodes, match.end.outputs) is not None:
            return "a GELU intermediate is read elsewhere"
        return None

    def rewrite(self, match: GeluMatch, edit: Edit) -> None:
        edit.add("Gelu", match.end.name, [match.x], [match.end.outputs[0]], {"approximate": match.form.value},
                 like=match.end)


class FuseGelu(Pass):
    name = "fuse-gelu"
    preserves = frozenset({GraphProperty.NODES_NAMED, GraphProperty.SHAPES_KNOWN, GraphProperty.QDQ_PAIRED})

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        if graph.opset < MIN_OPSET:
            return PassResult(modified=False, detail=f"opset {graph.opset} < {MIN_OPSET}: nothing fused")
        report = apply(graph, [GeluRule()])
        fused = {form: sum(m.form is form for m in report.matches) for form in GeluForm}
        return PassResult(modified=bool(report.matches),
                          detail=report.detail(", ".join(f"{n} {f.name.lower()}" for f, n in fused.items())))


def _close(t: gs.Tensor, value: float) -> bool:
    return is_scalar(t, value, CONST_RTOL)


def _mul_by(node: gs.Node | None, value: float) -> gs.Tensor | None:
    """The data operand of Mul(data, value) in either order, else None."""
    if node is None or node.op != "Mul":
        return None
    a, b = node.inputs
    return a if _close(b, value) else b if _close(a, value) else None


def _erf_input(erf: gs.Node) -> gs.Tensor:
    """x when the Erf reads x / sqrt(2) (a Div or a Mul by 1/sqrt(2))."""
    node = producer(erf.inputs[0])
    if node is not None and node.op == "Div" and _close(node.inputs[1], math.sqrt(2.0)):
        return node.inputs[0]
    x = _mul_by(node, 1.0 / math.sqrt(2.0))
    require(x is not None, "the Erf does not read x / sqrt(2)")
    return x


def _is_cube_of(t: gs.Tensor, x: gs.Tensor) -> bool:
    node = producer(t)
    if node is None:
        return False
    if node.op == "Pow":
        return node.inputs[0] is x and _close(node.inputs[1], 3.0)
    if node.op != "Mul":
        return False
    a, b = node.inputs
    for square, other in ((a, b), (b, a)):
        sq = producer(square)
        if other is x and sq is not None and sq.op == "Mul" and sq.inputs[0] is x is sq.inputs[1]:
            return True
    return False


def _tanh_input(tanh: gs.Node, view: GraphView) -> gs.Tensor:
    """x when the Tanh reads sqrt(2/pi) * (x + 0.044715 * x^3)."""
    inner = _mul_by(producer(tanh.inputs[0]), math.sqrt(2.0 / math.pi))
    add = producer(inner) if inner is not None else None
    require(add is not None and add.op == "Add", "the Tanh does not read sqrt(2/pi) * (x + 0.044715 x^3)")
    for x, cubic in ((add.inputs[0], add.inputs[1]), (add.inputs[1], add.inputs[0])):
        cube = _mul_by(producer(cubic), CUBIC)
        if cube is not None and _is_cube_of(cube, x):
            return x
    raise NoMatch("the Tanh's argument has no 0.044715 * x^3 term")


def _leaves(t: gs.Tensor, stop: tuple[gs.Tensor, ...], view: GraphView, root: bool) -> list[object] | None:
    """The factors of the Mul tree producing `t`: tensors in `stop`, or floats for constants."""
    if any(t is s for s in stop):
        return [t]
    values = constant_values(t)
    if values is not None:
        return [float(values.reshape(-1)[0])] if values.size == 1 else None
    node = producer(t)
    if node is None or node.op != "Mul" or (not root and not view.single_use(t)):
        return None
    left = _leaves(node.inputs[0], stop, view, False)
    right = _leaves(node.inputs[1], stop, view, False)
    return None if left is None or right is None else left + right


def _product_end(act: gs.Node, x: gs.Tensor, view: GraphView) -> gs.Node:
    """The Mul that completes x * 0.5 * (1 + act(.))."""
    add = reader(act.outputs[0], "Add")
    require(add is not None and _close(add.inputs[1] if add.inputs[0] is act.outputs[0] else add.inputs[0], 1.0),
            f"no 1 + {act.op}(.) follows the {act.op}")
    one_plus = t = add.outputs[0]
    for _ in range(MAX_PRODUCT_STEPS):
        node = view.only_consumer(t, "Mul")
        require(node is not None, f"1 + {act.op}(.) does not reach x * 0.5 * (.) through one Mul chain")
        leaves = _leaves(node.outputs[0], (x, one_plus), view, True)
        if leaves is not None:
            tensors = [f for f in leaves if isinstance(f, gs.Tensor)]
            consts = [f for f in leaves if not isinstance(f, gs.Tensor)]
            if (len(tensors) == 2 and any(f is x for f in tensors) and any(f is one_plus for f in tensors)
                    and math.isclose(float(np.prod(consts)), 0.5, rel_tol=CONST_RTOL)):
                return node
        t = node.outputs[0]
    raise NoMatch(f"no product x * 0.5 * (1 + {act.op}(.)) within {MAX_PRODUCT_STEPS} Muls")
