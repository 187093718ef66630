"""Decomposed LayerNorm -> one `LayerNormalization` node (opset 17+).

Dynamo exports already emit LayerNormalization; exports at older opsets, the legacy exporter on some
models and hand-written graphs spell it out:
    mean = ReduceMean(x); d = Sub(x, mean); var = ReduceMean(Pow(d, 2) | Mul(d, d))
    y = Div(d, Sqrt(Add(var, eps)))  |  Mul(d, Reciprocal(Sqrt(Add(var, eps))))
    [Mul(y, gamma)] [Add(., beta)]
Why fuse: targets quantize around a LayerNorm as one op (TFLite, QNN and TensorRT all have a kernel);
left decomposed, Q/DQ insertion would see nine ops whose intermediate ranges (the variance!) are
the worst possible to quantize. Both reductions must cover the same trailing axes, which become
`axis = -k`. RMSNorm (no mean subtraction, used by SD3/Flux) does not match: it has no Sub.
The norm-shaped pieces (reduced axes, epsilon root, affine operand) are shared with fuse_rmsnorm.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from qcompile.graph_io import constant_values
from qcompile.pass_manager import GraphProperty, Pass, PassContext, PassResult
from qcompile.rewrite import (
    Edit,
    GraphView,
    Rule,
    apply,
    consumers,
    is_scalar,
    other_operand,
    reader,
    require,
    scalar_value,
    subgraph,
)

MIN_OPSET = 17


@dataclass(frozen=True)
class NormMatch:
    """A decomposed LayerNorm or RMSNorm: input, the node writing the result, and its attributes."""

    x: gs.Tensor
    last: gs.Node
    axis: int
    epsilon: float
    scale: np.ndarray
    bias: np.ndarray | None
    nodes: tuple[gs.Node, ...]


class LayerNormRule(Rule[NormMatch]):
    name = "fuse-layernorm"
    anchors = frozenset({"ReduceMean"})

    def match(self, anchor: gs.Node, view: GraphView) -> NormMatch:
        return _match(anchor, view)

    def check(self, match: NormMatch, view: GraphView) -> str | None:
        return norm_check(match, view)

    def rewrite(self, match: NormMatch, edit: Edit) -> None:
        last = match.last
        inputs = [match.x, gs.Constant(f"{last.name}_scale", match.scale)]
        if match.bias is not None:
            inputs.append(gs.Constant(f"{last.name}_bias", match.bias))
        edit.add("LayerNormalization", last.name, inputs, [last.outputs[0]],
                 {"axis": match.axis, "epsilon": match.epsilon}, like=last)


class FuseLayerNorm(Pass):
    name = "fuse-layernorm"
    requires = frozenset({GraphProperty.NODES_NAMED, GraphProperty.SHAPES_KNOWN})
    preserves = frozenset({GraphProperty.NODES_NAMED, GraphProperty.SHAPES_KNOWN, GraphProperty.QDQ_PAIRED})

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        if graph.opset < MIN_OPSET:
            return PassResult(modified=False, detail=f"opset {graph.opset} < {MIN_OPSET}: nothing fused")
        report = apply(graph, [LayerNormRule()])
        return PassResult(modified=bool(report.matches), detail=report.detail(f"{len(report.matches)} fused"))


# --- matching (shared with fuse_rmsnorm) ----------------------------------------------------------
def norm_check(match: NormMatch, view: GraphView) -> str | None:
    if view.escaping(match.nodes, match.last.outputs) is not None:
        return "an intermediate of the norm is read elsewhere"
    return None


def reduced_axes(node: gs.Node, opset: int, rank: int) -> tuple[int, ...] | None:
    """Negative axes of a keepdims ReduceMean, or None when they cannot be read."""
    if not node.attrs.get("keepdims", 1):
        return None
    if opset >= 18:
        axes = constant_values(node.inputs[1]) if len(node.inputs) > 1 else None
    else:
        axes = node.attrs.get("axes")
    if axes is None:
        return None
    return tuple(sorted(int(a) - rank if int(a) >= 0 else int(a) for a in np.ravel(axes)))


def affine_operand(node: gs.Node, data: gs.Tensor, norm_shape: tuple[int, ...]) -> np.ndarray | None:
    """The other operand of `node`, broadcast to the normalized shape, when it broadcasts only there."""
    values = constant_values(other_operand(node, data))
    if values is None:
        return None
    trailing = values.shape[values.ndim - len(norm_shape):] if values.ndim > len(norm_shape) else values.shape
    if any(d != 1 for d in values.shape[:values.ndim - len(trailing)]):
        return None
    try:
        return np.ascontiguousarray(np.broadcast_to(values.reshape(trailing), norm_shape))
    except ValueError:
        return None


def trailing_norm_shape(mean: gs.Node, x: gs.Tensor, opset: int) -> tuple[int, ...]:
    """The static shape of the axes `mean` reduces `x` over, which must be its trailing axes (a norm's
    normalized shape) and of known size."""
    require(x.shape is not None, "the normalized tensor has no shape")
    axes = reduced_axes(mean, opset, len(x.shape))
    require(axes is not None and axes == tuple(range(-len(axes), 0)),
            "the ReduceMean does not reduce trailing axes with keepdims")
    norm_shape = tuple(x.shape[len(x.shape) - len(axes):])
    require(all(isinstance(d, int) for d in norm_shape), "the normalized axes are not static")
    return norm_shape


def epsilon_root(mean_square: gs.Tensor) -> tuple[float, gs.Node]:
    """(eps, the Sqrt node) for Sqrt(Add(mean_square, eps))."""
    add_eps = reader(mean_square, "Add")
    eps = scalar_value(other_operand(add_eps, mean_square)) if add_eps is not None else None
    sqrt = reader(add_eps.outputs[0], "Sqrt") if eps is not None else None
    require(sqrt is not None, "the mean square is not followed by Sqrt(Add(., eps))")
    return eps, sqrt


def affine_tail(last: gs.Node, norm_shape: tuple[int, ...], view: GraphView, ops: tuple[str, ...]):
    """Extend the norm by the following Mul (scale) and Add (bias) named in `ops`, each when it is the
    only reader and its constant broadcasts over the normalized axes: (node writing the result, scale
    or None, bias or None)."""
    found: dict[str, np.ndarray] = {}
    for op in ops:
        node = view.only_consumer(last.outputs[0], op)
        values = affine_operand(node, last.outputs[0], norm_shape) if node is not None else None
        if values is not None:
            found[op], last = values, node
    return last, found.get("Mul"), found.get("Add")


def _match(mean: gs.Node, view: GraphView) -> NormMatch:
    opset = view.graph.opset
    x = mean.inputs[0]
    sub = reader(mean.outputs[0], "Sub")
    require(sub is not None and sub.inputs[0] is x and sub.inputs[1] is mean.outputs[0],
            "the mean is not subtracted from its input")
    norm_shape = trailing_norm_shape(mean, x, opset)
    axes = tuple(range(-len(norm_shape), 0))
    d = sub.outputs[0]
    users = consumers(d)
    square = next((u for u in users if u.op == "Pow" or (u.op == "Mul" and u.inputs[0] is d is u.inputs[1])), None)
    divide = next((u for u in users if u is not square and u.op in ("Div", "Mul")), None)
    require(square is not None and divide is not None and (square.op != "Pow" or is_scalar(square.inputs[1], 2.0)),
            "x - mean is not both squared and normalized")
    var = reader(square.outputs[0], "ReduceMean")
    require(var is not None and reduced_axes(var, opset, len(x.shape)) == axes,
            "the square is not averaged over the same axes")
    eps, sqrt = epsilon_root(var.outputs[0])
    if divide.op == "Div":
        require(divide.inputs[0] is d and divide.inputs[1] is sqrt.outputs[0], "x - mean is not divided by the root")
    else:
        recip = reader(sqrt.outputs[0], "Reciprocal")
        require(recip is not None and other_operand(divide, d) is recip.outputs[0],
                "x - mean is not multiplied by the inverse root")
    last, gamma, beta = affine_tail(divide, norm_shape, view, ("Mul", "Add"))
    if gamma is None:
        gamma = np.ones(norm_shape, np.dtype(x.dtype) if x.dtype is not None else np.float32)
    return NormMatch(x, last, -len(axes), eps, gamma, beta, subgraph([x], last.outputs))
