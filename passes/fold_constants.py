"""Constant folding that never loads weights it does not fold.

onnx-graphsurgeon's own folder serialises the graph for onnxruntime, which breaks on external data
and can pull every weight into memory. This pass evaluates one node at a time, only when all its
inputs are constants, feeding them to a one-node onnxruntime session. It also turns Constant nodes
into initializers and folds `Shape` of tensors whose shape is static.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort

from qcompile.graph_io import constant_values, redirect_consumers
from qcompile.pass_manager import GraphProperty, Pass, PassContext, PassResult

# Ops never folded: quantization structure must survive; random ops are not constant.
NEVER_FOLD = frozenset(
    {"QuantizeLinear", "DequantizeLinear", "RandomNormal", "RandomUniform", "RandomNormalLike",
     "RandomUniformLike", "Multinomial", "Bernoulli"}
)
# A folded output may not grow past this, nor past its inputs (Expand/Tile of a scalar into a huge tensor).
MAX_GROWTH_BYTES = 1 << 20
# onnx writes the newest IR version by default, which onnxruntime may not read yet.
EVAL_IR_VERSION = 10


class FoldConstants(Pass):
    name = "fold-constants"
    preserves = frozenset({GraphProperty.NODES_NAMED})

    def __init__(self, opset: int | None = None):
        self.opset = opset

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        folded = 0
        opset = self.opset or graph.opset
        graph_outputs = {t.name for t in graph.outputs}
        for node in list(graph.nodes):
            if any(t.name in graph_outputs for t in node.outputs):
                continue
            if node.op == "Constant":
                folded += _constant_node_to_initializer(node)
            elif node.op == "Shape":
                folded += _fold_static_shape(node)
            elif node.op not in NEVER_FOLD and node.domain in (None, "", "ai.onnx") and node.inputs:
                folded += _fold_node(node, opset)
        if folded:
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(modified=bool(folded), detail=f"{folded} folded")


def _replace_output(node: gs.Node, index: int, value: np.ndarray) -> None:
    out = node.outputs[index]
    const = gs.Constant(out.name, np.array(value, order="C"))  # ascontiguousarray would make 0-d 1-d
    redirect_consumers(out, const)
    node.outputs[index] = gs.Variable(out.name + "__folded")  # detach; cleanup removes the node


def _constant_node_to_initializer(node: gs.Node) -> int:
    value = node.attrs.get("value")
    if not isinstance(value, gs.Constant):
        return 0
    _replace_output(node, 0, np.asarray(value.values))
    return 1


def _fold_static_shape(node: gs.Node) -> int:
    shape = node.inputs[0].shape
    if shape is None or not all(isinstance(d, int) for d in shape):
        return 0
    start = node.attrs.get("start", 0)
    end = node.attrs.get("end", len(shape))
    _replace_output(node, 0, np.array(shape, dtype=np.int64)[start:end])
    return 1


def _fold_node(node: gs.Node, opset: int) -> int:
    values = []
    for t in node.inputs:
        if t.name == "":  # omitted optional input
            values.append(None)
            continue
        v = constant_values(t)
        if v is None:
            return 0
        values.append(v)
    if any(isinstance(a, gs.Graph) for a in node.attrs.values()):
        return 0
    in_bytes = sum(v.nbytes for v in values if v is not None)
    try:
        outputs = _evaluate(node, values, opset)
    except Exception:  # an op onnxruntime cannot evaluate alone stays as it is
        return 0
    if sum(o.nbytes for o in outputs) > max(in_bytes, MAX_GROWTH_BYTES):
        return 0
    for i, out in enumerate(outputs):
        _replace_output(node, i, out)
    return 1


def _evaluate(node: gs.Node, values: list[np.ndarray | None], opset: int) -> list[np.ndarray]:
    in_names = [f"i{i}" if v is not None else "" for i, v in enumerate(values)]
    out_names = [f"o{i}" for i in range(len(node.outputs))]
    attrs = {k: (onnx.numpy_helper.from_array(np.asarray(v.values)) if isinstance(v, gs.Constant) else v)
             for k, v in node.attrs.items()}
    proto_node = onnx.helper.make_node(node.op, in_names, out_names, **attrs)
    inputs = [
        onnx.helper.make_tensor_value_info(n, onnx.helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
        for n, v in zip(in_names, values, strict=True) if v is not None
    ]
    outputs = [onnx.helper.make_empty_tensor_value_info(n) for n in out_names]
    model = onnx.helper.make_model(
        onnx.helper.make_graph([proto_node], "fold", inputs, outputs),
        opset_imports=[onnx.helper.make_opsetid("", opset)],
        ir_version=EVAL_IR_VERSION,
    )
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    feed = {n: np.asarray(v) for n, v in zip(in_names, values, strict=True) if v is not None}
    return [np.asarray(o) for o in sess.run(out_names, feed)]
