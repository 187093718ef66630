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
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from qcompile.graph_io import constant_values, tag_new_node
from qcompile.pass_manager import GraphProperty, Pass, PassContext, PassResult

MIN_OPSET = 17


class FuseLayerNorm(Pass):
    name = "fuse-layernorm"
    requires = frozenset({GraphProperty.NODES_NAMED, GraphProperty.SHAPES_KNOWN})
    preserves = frozenset({GraphProperty.NODES_NAMED, GraphProperty.SHAPES_KNOWN, GraphProperty.QDQ_PAIRED})

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        if graph.opset < MIN_OPSET:
            return PassResult(modified=False, detail=f"opset {graph.opset} < {MIN_OPSET}: nothing fused")
        outs = {t.name for t in graph.outputs}
        fused = 0
        for node in list(graph.nodes):
            if node.op == "ReduceMean" and node.outputs:
                fused += self._fuse(graph, node, outs)
        if fused:
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(modified=bool(fused), detail=f"{fused} fused")

    def _fuse(self, graph: gs.Graph, mean_node: gs.Node, outs: set[str]) -> int:
        match = _match(mean_node, graph.opset, outs)
        if match is None:
            return 0
        x, last, axis, eps, gamma, beta = match
        inputs = [x, gs.Constant(f"{last.name}_scale", gamma)]
        if beta is not None:
            inputs.append(gs.Constant(f"{last.name}_bias", beta))
        y = last.outputs[0]
        node = gs.Node("LayerNormalization", last.name, {"axis": axis, "epsilon": eps}, inputs, [y])
        last.outputs.clear()  # detached: cleanup removes the decomposed nodes
        graph.nodes.append(tag_new_node(node, self.name, like=last))
        return 1


# --- matching (shared with fuse_rmsnorm) ----------------------------------------------------------
def consumers(t: gs.Tensor) -> list[gs.Node]:
    return list({id(c): c for c in t.outputs}.values())


def only_consumer(t: gs.Tensor, outs: set[str], op: str) -> gs.Node | None:
    readers = consumers(t)
    if len(readers) != 1 or t.name in outs or readers[0].op != op:
        return None
    return readers[0]


def other_operand(node: gs.Node, t: gs.Tensor) -> gs.Tensor:
    return node.inputs[1] if node.inputs[0] is t else node.inputs[0]


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


def scalar_value(t: gs.Tensor) -> float | None:
    values = constant_values(t)
    return float(values.reshape(-1)[0]) if values is not None and values.size == 1 else None


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


def trailing_norm_shape(mean: gs.Node, x: gs.Tensor, opset: int) -> tuple[int, ...] | None:
    """The static shape of the axes `mean` reduces `x` over, when they are its trailing axes (a norm's
    normalized shape); None for other axes or a symbolic dimension."""
    if x.shape is None:
        return None
    axes = reduced_axes(mean, opset, len(x.shape))
    if axes is None or axes != tuple(range(-len(axes), 0)):
        return None
    norm_shape = tuple(x.shape[len(x.shape) - len(axes):])
    return norm_shape if all(isinstance(d, int) for d in norm_shape) else None


def epsilon_root(mean_square: gs.Tensor, outs: set[str]) -> tuple[float, gs.Node] | None:
    """(eps, the Sqrt node) for Sqrt(Add(mean_square, eps)), each op the only reader of its input."""
    add_eps = only_consumer(mean_square, outs, "Add")
    eps = scalar_value(other_operand(add_eps, mean_square)) if add_eps is not None else None
    sqrt = only_consumer(add_eps.outputs[0], outs, "Sqrt") if eps is not None else None
    return None if sqrt is None else (eps, sqrt)


def _match(mean: gs.Node, opset: int, outs: set[str]):
    x = mean.inputs[0]
    norm_shape = trailing_norm_shape(mean, x, opset)
    if norm_shape is None:
        return None
    axes = tuple(range(-len(norm_shape), 0))
    sub = only_consumer(mean.outputs[0], outs, "Sub")
    if sub is None or sub.inputs[0] is not x or sub.inputs[1] is not mean.outputs[0]:
        return None
    d = sub.outputs[0]
    users = consumers(d)
    if d.name in outs or len(users) != 2:
        return None
    square = next((u for u in users if u.op == "Pow" or (u.op == "Mul" and u.inputs[0] is d is u.inputs[1])), None)
    divide = next((u for u in users if u is not square and u.op in ("Div", "Mul")), None)
    if square is None or divide is None or (square.op == "Pow" and scalar_value(square.inputs[1]) != 2.0):
        return None
    var = only_consumer(square.outputs[0], outs, "ReduceMean")
    if var is None or var.inputs[0] is not square.outputs[0] or reduced_axes(var, opset, len(x.shape)) != axes:
        return None
    root = epsilon_root(var.outputs[0], outs)
    if root is None:
        return None
    eps, sqrt = root
    if divide.op == "Div":
        if divide.inputs[0] is not d or divide.inputs[1] is not sqrt.outputs[0]:
            return None
    else:
        recip = only_consumer(sqrt.outputs[0], outs, "Reciprocal")
        if recip is None or other_operand(divide, d) is not recip.outputs[0]:
            return None
    last, tail, gamma, beta = divide, divide.outputs[0], None, None
    mul = only_consumer(tail, outs, "Mul")
    if mul is not None and (gamma := affine_operand(mul, tail, norm_shape)) is not None:
        last, tail = mul, mul.outputs[0]
    add = only_consumer(tail, outs, "Add")
    if add is not None and (beta := affine_operand(add, tail, norm_shape)) is not None:
        last = add
    if gamma is None:
        gamma = np.ones(norm_shape, np.dtype(x.dtype) if x.dtype is not None else np.float32)
    return x, last, -len(axes), eps, gamma, beta
