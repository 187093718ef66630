"""Decomposed GELU -> one ONNX `Gelu` node (opset 20), exact (erf) or tanh approximation.

Forms matched, with any association and operand order of the final product:
    erf:  x * 0.5 * (1 + Erf(x / sqrt(2)))          (or Erf(x * 0.70710678))
    tanh: x * 0.5 * (1 + Tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))   (x^3 as Pow(x, 3) or x*x*x)
Why fuse: quantizing the decomposed form puts Q/DQ on Erf/Tanh intermediates whose ranges say nothing
about the activation; as one op the targets use their GELU kernel (or a LUT) and quantize only its
input and output. The product is recognised by flattening the Mul tree above `1 + erf(.)` into its
leaves, which must be exactly {x, 1 + erf(.), constants multiplying to 0.5}: a Mul by anything else
(GEGLU's `hidden * gelu(gate)`) ends the search before it.
"""

from __future__ import annotations

import enum
import math

import numpy as np
import onnx_graphsurgeon as gs

from qcompile.graph_io import constant_values, tag_new_node
from qcompile.pass_manager import GraphProperty, Pass, PassContext, PassResult

MIN_OPSET = 20
# Exporters and hand-written graphs round these constants differently.
CONST_RTOL = 1e-4
CUBIC = 0.044715
MAX_PRODUCT_STEPS = 3


class GeluForm(enum.Enum):
    ERF = "none"  # the values are ONNX Gelu's `approximate` attribute
    TANH = "tanh"


class FuseGelu(Pass):
    name = "fuse-gelu"
    preserves = frozenset({GraphProperty.NODES_NAMED, GraphProperty.SHAPES_KNOWN, GraphProperty.QDQ_PAIRED})

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        if graph.opset < MIN_OPSET:
            return PassResult(modified=False, detail=f"opset {graph.opset} < {MIN_OPSET}: nothing fused")
        outs = {t.name for t in graph.outputs}
        fused = {form: 0 for form in GeluForm}
        for node in list(graph.nodes):
            if node.op == "Erf":
                form, x = GeluForm.ERF, _erf_input(node, outs)
            elif node.op == "Tanh":
                form, x = GeluForm.TANH, _tanh_input(node, outs)
            else:
                continue
            end = _product_end(node, x, outs) if x is not None else None
            if end is None:
                continue
            gelu = gs.Node("Gelu", end.name, {"approximate": form.value}, [x], [end.outputs[0]])
            end.outputs.clear()
            graph.nodes.append(tag_new_node(gelu, self.name, like=end))
            fused[form] += 1
        total = sum(fused.values())
        if total:
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(modified=bool(total), detail=", ".join(f"{n} {f.name.lower()}" for f, n in fused.items()))


def _close(t: gs.Tensor, value: float) -> bool:
    values = constant_values(t)
    return values is not None and values.size == 1 and math.isclose(float(values.reshape(-1)[0]), value,
                                                                   rel_tol=CONST_RTOL)


def _single_use(t: gs.Tensor, outs: set[str]) -> bool:
    return len({id(c) for c in t.outputs}) == 1 and t.name not in outs


def _producer(t: gs.Tensor) -> gs.Node | None:
    return t.inputs[0] if len(t.inputs) == 1 else None


def _mul_by(node: gs.Node | None, value: float) -> gs.Tensor | None:
    """The data operand of Mul(data, value) in either order, else None."""
    if node is None or node.op != "Mul":
        return None
    a, b = node.inputs
    return a if _close(b, value) else b if _close(a, value) else None


def _erf_input(erf: gs.Node, outs: set[str]) -> gs.Tensor | None:
    """x when the Erf reads x / sqrt(2) (a Div or a Mul by 1/sqrt(2)) that nothing else reads."""
    arg = erf.inputs[0]
    node = _producer(arg)
    if node is None or not _single_use(arg, outs):
        return None
    if node.op == "Div" and _close(node.inputs[1], math.sqrt(2.0)):
        return node.inputs[0]
    return _mul_by(node, 1.0 / math.sqrt(2.0))


def _is_cube_of(t: gs.Tensor, x: gs.Tensor, outs: set[str]) -> bool:
    node = _producer(t)
    if node is None or not _single_use(t, outs):
        return False
    if node.op == "Pow":
        return node.inputs[0] is x and _close(node.inputs[1], 3.0)
    if node.op != "Mul":
        return False
    a, b = node.inputs
    for square, other in ((a, b), (b, a)):
        sq = _producer(square)
        if other is x and sq is not None and sq.op == "Mul" and sq.inputs[0] is x is sq.inputs[1]:
            return _single_use(square, outs)
    return False


def _tanh_input(tanh: gs.Node, outs: set[str]) -> gs.Tensor | None:
    """x when the Tanh reads sqrt(2/pi) * (x + 0.044715 * x^3)."""
    arg = tanh.inputs[0]
    if not _single_use(arg, outs):
        return None
    inner = _mul_by(_producer(arg), math.sqrt(2.0 / math.pi))
    add = _producer(inner) if inner is not None and _single_use(inner, outs) else None
    if add is None or add.op != "Add":
        return None
    for x, cubic in ((add.inputs[0], add.inputs[1]), (add.inputs[1], add.inputs[0])):
        cube = _mul_by(_producer(cubic), CUBIC) if _single_use(cubic, outs) else None
        if cube is not None and _is_cube_of(cube, x, outs):
            return x
    return None


def _leaves(t: gs.Tensor, stop: tuple[gs.Tensor, ...], outs: set[str], root: bool) -> list[object] | None:
    """The factors of the Mul tree producing `t`: tensors in `stop`, or floats for constants."""
    if any(t is s for s in stop):
        return [t]
    values = constant_values(t)
    if values is not None:
        return [float(values.reshape(-1)[0])] if values.size == 1 else None
    node = _producer(t)
    if node is None or node.op != "Mul" or (not root and not _single_use(t, outs)):
        return None
    left = _leaves(node.inputs[0], stop, outs, False)
    right = _leaves(node.inputs[1], stop, outs, False)
    return None if left is None or right is None else left + right


def _product_end(act: gs.Node, x: gs.Tensor, outs: set[str]) -> gs.Node | None:
    """The Mul that completes x * 0.5 * (1 + act(.)), or None."""
    out = act.outputs[0]
    if not _single_use(out, outs) or out.outputs[0].op != "Add":
        return None
    add = out.outputs[0]
    if not _close(add.inputs[1] if add.inputs[0] is out else add.inputs[0], 1.0):
        return None
    one_plus = t = add.outputs[0]
    for _ in range(MAX_PRODUCT_STEPS):
        if not _single_use(t, outs):
            return None
        node = t.outputs[0]
        if node.op != "Mul":
            return None
        leaves = _leaves(node.outputs[0], (x, one_plus), outs, True)
        if leaves is not None:
            tensors = [f for f in leaves if isinstance(f, gs.Tensor)]
            consts = [f for f in leaves if not isinstance(f, gs.Tensor)]
            if (len(tensors) == 2 and any(f is x for f in tensors) and any(f is one_plus for f in tensors)
                    and math.isclose(float(np.prod(consts)), 0.5, rel_tol=CONST_RTOL)):
                return node
        t = node.outputs[0]
    return None
