"""Q/DQ insertion: int8 per-channel weights and per-tensor activations around the ops a target runs in integer.

Two steps, so calibration can sit between them:
1. `plan_quantization` reads the float graph and the target's caps and decides which tensors get
   quantized (activation edges, weights with their channel axis, biases). Calibration then observes
   exactly `plan.activations`.
2. `InsertQDQ(plan, ranges)` rewrites the graph: weights become int8 initializers behind a
   DequantizeLinear (stored 4x smaller), each activation edge gets one QuantizeLinear/DequantizeLinear
   pair read by the quantized consumers. Running it again with another set of ranges (a timestep
   bucket) gives the same weights and new activation scales.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from qcompile.caps import TargetCaps
from qcompile.graph_io import constant_values, module_path, redirect_consumers, tag_new_node
from qcompile.pass_manager import GraphProperty, Pass, PassContext, PassResult
from qcompile.quant import QParams, QuantDType, TensorRange, activation_qparams, quantize, weight_qparams
from qcompile.rewrite import producer, weight_axis

PASS_NAME = "insert-qdq"


@dataclass(frozen=True)
class WeightSlot:
    """A constant weight input of a quantized node and its output-channel axis."""

    node: str
    input_index: int
    axis: int


@dataclass(frozen=True)
class QuantPlan:
    activations: tuple[str, ...]  # tensors needing a calibrated range, in graph order
    weights: tuple[WeightSlot, ...]
    biases: tuple[tuple[str, int], ...]  # (node, weight input index) whose input 2 is a float bias
    # (node name, tensor) pairs: which quantized consumer reads which activation through Q/DQ
    consumers: tuple[tuple[str, str], ...]
    # Outputs of quantized ops: every consumer reads them through Q/DQ, or the runtime cannot fuse.
    shared_outputs: tuple[str, ...] = field(default=())
    # Weighted nodes taken out of the main precision, by name: kept float, or on integer-only targets
    # computed with the caps' wide activation dtype (`widen_activations`).
    excluded: tuple[str, ...] = field(default=())
    # (tensor, scale, zero point): outputs of caps.int8_ops whose parameters the kernel fixes.
    fixed: tuple[tuple[str, float, int], ...] = field(default=())


def _float32(t: gs.Tensor) -> bool:
    """Activations are quantized from float32 only (exporters compute some positions in float64)."""
    return t.dtype is None or np.dtype(t.dtype) == np.float32


def is_excluded(node: gs.Node, patterns: Sequence[re.Pattern[str]]) -> bool:
    path = module_path(node)
    return any(p.search(node.name) or (path and p.search(path)) for p in patterns)


def plan_quantization(graph: gs.Graph, caps: TargetCaps, exclude: Sequence[str] = ()) -> QuantPlan:
    patterns = [re.compile(p) for p in exclude]
    if caps.integer_only:  # every float tensor; excluded layers get wide activations, never float
        from qcompile.passes.insert_qdq_integer import plan_integer

        return plan_integer(graph, caps, patterns)
    if caps.explicit is not None:  # TensorRT's placement rules: whole layers, residual Adds, attention
        from qcompile.passes.plan_explicit import plan_explicit

        return plan_explicit(graph, caps, patterns)
    activations: dict[str, None] = {}
    weights: list[WeightSlot] = []
    biases: list[tuple[str, int]] = []
    consumers: list[tuple[str, str]] = []
    shared_outputs: list[str] = []
    excluded: list[str] = []
    graph_outputs = {t.name for t in graph.outputs}
    fixed: list[tuple[str, float, int]] = []
    fixed_by_op = {op: (scale, zero) for op, scale, zero in caps.fixed_output_qparams}
    for node in graph.nodes:
        if node.op in caps.int8_ops and node.op not in caps.weighted_ops:
            inputs = [t for t in node.inputs if t.name]
            if (is_excluded(node, patterns) or any(constant_values(t) is not None for t in inputs)
                    or not all(_float32(t) for t in [*inputs, node.outputs[0]])):
                continue
            for t in inputs:
                activations[t.name] = None
                consumers.append((node.name, t.name))
            out = node.outputs[0]
            if out.name not in graph_outputs:
                activations[out.name] = None
                shared_outputs.append(out.name)
                if node.op in fixed_by_op:
                    fixed.append((out.name, *fixed_by_op[node.op]))
            continue
        if node.op not in caps.weighted_ops:
            continue
        if is_excluded(node, patterns):
            excluded.append(node.name)
            continue
        data, weight = node.inputs[0], node.inputs[1]
        w_values = constant_values(weight)
        if w_values is None:
            if not (node.op == "MatMul" and caps.activation_matmul and _float32(data) and _float32(weight)):
                continue
            act_inputs = [data, weight]
        else:
            if node.op == "Gemm" and node.attrs.get("transA", 0):
                continue
            axis = weight_axis(node, w_values.ndim)
            if axis is None or constant_values(data) is not None:
                continue
            weights.append(WeightSlot(node.name, 1, axis))
            if caps.quantize_bias and node.op in ("Conv", "Gemm") and len(node.inputs) > 2:
                bias = constant_values(node.inputs[2])
                if bias is not None and bias.ndim == 1:
                    biases.append((node.name, 1))
            act_inputs = [data]
        for t in act_inputs:
            activations[t.name] = None
            consumers.append((node.name, t.name))
        if node.op in caps.quantize_outputs_of and node.outputs[0].name not in graph_outputs:
            activations[node.outputs[0].name] = None
            shared_outputs.append(node.outputs[0].name)
    return QuantPlan(tuple(activations), tuple(weights), tuple(biases), tuple(consumers),
                     tuple(shared_outputs), tuple(excluded), tuple(fixed))


class InsertQDQ(Pass):
    name = PASS_NAME
    requires = frozenset({GraphProperty.NODES_NAMED})
    ensures = frozenset({GraphProperty.QDQ_PAIRED})
    preserves = frozenset({GraphProperty.NODES_NAMED, GraphProperty.SHAPES_KNOWN})

    def __init__(self, plan: QuantPlan, ranges: Mapping[str, TensorRange], caps: TargetCaps):
        self.plan = plan
        self.ranges = ranges
        self.caps = caps

    def activation_qparams(self) -> dict[str, QParams]:
        dtype = self.caps.activation_dtype
        fixed = {name: QParams(np.array(scale, np.float32), np.array(zero, dtype.numpy), dtype)
                 for name, scale, zero in self.plan.fixed}
        return {
            name: fixed[name] if name in fixed else
            activation_qparams(self.ranges[name], dtype, symmetric=self.caps.activation_symmetric)
            for name in self.plan.activations if name in fixed or name in self.ranges
        }

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        nodes = {n.name: n for n in graph.nodes}
        tensors = graph.tensors()
        act_qp = self.activation_qparams()
        weight_qp: dict[str, QParams] = {}
        for slot in self.plan.weights:
            weight_qp[slot.node] = self._quantize_weight(graph, nodes[slot.node], slot)
        for node_name, _ in self.plan.biases:
            node = nodes[node_name]
            in_qp = act_qp.get(node.inputs[0].name)
            if in_qp is not None:
                self._quantize_bias(graph, node, in_qp, weight_qp[node_name])
        readers: dict[str, set[str]] = {}
        for node_name, tensor_name in self.plan.consumers:
            readers.setdefault(tensor_name, set()).add(node_name)
        shared = set(self.plan.shared_outputs)
        for name, qp in act_qp.items():
            src = tensors[name]
            targets = [c for c in src.outputs if name in shared or c.name in readers.get(name, ())]
            dq_out = self._insert_pair(graph, src, qp)
            redirect_consumers(src, dq_out, targets)
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        detail = f"{len(act_qp)} activations, {len(weight_qp)} weights"
        return PassResult(modified=bool(act_qp or weight_qp), detail=detail)

    def _quantize_weight(self, graph: gs.Graph, node: gs.Node, slot: WeightSlot) -> QParams:
        weight = node.inputs[slot.input_index]
        values = np.asarray(constant_values(weight), np.float32)
        qp = weight_qparams(values, slot.axis, self.caps.weight_dtype)
        # A weight tied between nodes gets one quantized copy per node: each may have its own scales.
        name = f"{weight.name}_quantized" if len(weight.outputs) == 1 else f"{weight.name}_{node.name}_quantized"
        q = gs.Constant(name, quantize(values, qp, symmetric_range=True))
        node.inputs[slot.input_index] = self._dequantize(graph, q, qp, f"{node.name}_weight", node)
        return qp

    def _quantize_bias(self, graph: gs.Graph, node: gs.Node, in_qp: QParams, w_qp: QParams) -> None:
        bias = np.asarray(constant_values(node.inputs[2]), np.float32)
        qp = QParams((in_qp.scale * w_qp.scale).astype(np.float32),
                     np.zeros(bias.shape, np.int32), QuantDType.INT32, 0)
        q = gs.Constant(f"{node.inputs[2].name}_quantized", quantize(bias, qp))
        node.inputs[2] = self._dequantize(graph, q, qp, f"{node.name}_bias", node)

    def _dequantize(self, graph: gs.Graph, q: gs.Constant, qp: QParams, base: str, like: gs.Node) -> gs.Variable:
        return dequantize_constant(graph, q, qp, base, like, PASS_NAME)

    def _insert_pair(self, graph: gs.Graph, src: gs.Tensor, qp: QParams) -> gs.Variable:
        return insert_qdq_pair(graph, src, qp, PASS_NAME)


def dequantize_constant(graph: gs.Graph, q: gs.Constant, qp: QParams, base: str, like: gs.Node,
                        pass_name: str) -> gs.Variable:
    """A DequantizeLinear reading the quantized constant `q`; returns its float output."""
    out = gs.Variable(f"{base}_dequantized", dtype=np.float32, shape=q.shape)
    attrs = {} if qp.axis is None else {"axis": qp.axis}
    dq = gs.Node("DequantizeLinear", f"{base}_DequantizeLinear", attrs,
                 [q, gs.Constant(f"{base}_scale", qp.scale), gs.Constant(f"{base}_zero_point", qp.zero_point)],
                 [out])
    graph.nodes.append(tag_new_node(dq, pass_name, like))
    return out


def activation_qdq_pair(t: gs.Tensor) -> tuple[gs.Node, gs.Node] | None:
    """(QuantizeLinear, DequantizeLinear) when `t` is the dequantized output of an activation's pair
    (a constant's DequantizeLinear reads stored integers, with no QuantizeLinear before it)."""
    dq = producer(t)
    if dq is None or dq.op != "DequantizeLinear":
        return None
    q = producer(dq.inputs[0])
    if q is None or q.op != "QuantizeLinear" or constant_values(q.inputs[0]) is not None:
        return None
    return q, dq


def insert_qdq_pair(graph: gs.Graph, src: gs.Tensor, qp: QParams, pass_name: str) -> gs.Variable:
    """QuantizeLinear -> DequantizeLinear on `src`; returns the dequantized tensor (consumers are not moved)."""
    scale = gs.Constant(f"{src.name}_scale", qp.scale)
    zero = gs.Constant(f"{src.name}_zero_point", qp.zero_point)
    q_out = gs.Variable(f"{src.name}_quantized", dtype=qp.dtype.numpy, shape=src.shape)
    dq_out = gs.Variable(f"{src.name}_dequantized", dtype=np.float32, shape=src.shape)
    like = src.inputs[0] if src.inputs else None
    graph.nodes.append(tag_new_node(
        gs.Node("QuantizeLinear", f"{src.name}_QuantizeLinear", {}, [src, scale, zero], [q_out]), pass_name, like))
    graph.nodes.append(tag_new_node(
        gs.Node("DequantizeLinear", f"{src.name}_DequantizeLinear", {}, [q_out, scale, zero], [dq_out]),
        pass_name, like))
    return dq_out
