"""Q/DQ for integer-only targets: every float tensor quantized, every float constant quantized by role.

An NPU such as Qualcomm's HTP runs a graph only if each op is a "node unit" DQ -> op -> Q: every
activation (graph inputs and outputs included) and every constant operand must be quantized, or the
op falls back to the CPU (or the build fails when fallback is off). The ORT/TFLite planner
(`insert_qdq.plan_quantization`) quantizes around chosen ops; this one quantizes everything, reading
the operand rules from the target's caps:
- Conv/Gemm weights: symmetric per output channel; `per_tensor_weights` (MatMul, the norms' scale):
  per tensor in the dtype the target names; `bias_ops` input 2: int32 at s_input * s_weight;
- `float_operands` (Resize scales) stay float: they are parameters, not data;
- any other float constant (an Add's beta, a Mul's scalar): per tensor in the activation dtype,
  covering its own values;
- outputs of `same_scale_ops` (Reshape, Transpose, ...) carry their input's parameters, outputs of
  ops in `fixed_output_qparams` (Sigmoid) the kernel's fixed ones, all others their calibrated range,
  its scale rounded up to a power of two for ops in `power_of_two_scale_ops` (HTP's 8-bit Softmax).
Activations above 8 bits need QuantizeLinear-21, so the graph's opset is raised to 21 for them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np
import onnx_graphsurgeon as gs

from qcompile.caps import TargetCaps
from qcompile.errors import UserError
from qcompile.graph_io import constant_values, raise_opset, redirect_consumers
from qcompile.pass_manager import GraphProperty, Pass, PassContext, PassResult
from qcompile.passes.insert_qdq import (
    QuantPlan,
    WeightSlot,
    dequantize_constant,
    insert_qdq_pair,
    is_excluded,
)
from qcompile.quant import (
    MIN_SCALE,
    QParams,
    QuantDType,
    TensorRange,
    activation_qparams,
    power_of_two_scale,
    quantize,
    weight_qparams,
)
from qcompile.rewrite import consumers, producer, weight_axis

PASS_NAME = "insert-qdq-integer"
WIDE_QDQ_OPSET = 21  # QuantizeLinear/DequantizeLinear accept 16-bit integers from opset 21
SKIP_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
# A graph output keeps its name behind its Q/DQ pair; its producer writes `<name>` + this suffix.
FLOAT_OUTPUT_SUFFIX = "_float"


def unrenamed(name: str, graph_outputs: set[str]) -> str:
    """The graph output a producer's `<name>_float` tensor stands for; other names unchanged."""
    base = name.removesuffix(FLOAT_OUTPUT_SUFFIX)
    return base if base != name and base in graph_outputs else name


def _is_float32(t: gs.Tensor) -> bool:
    return t.dtype is not None and np.dtype(t.dtype) == np.float32


def float_activations(graph: gs.Graph) -> list[gs.Variable]:
    """Float32 graph inputs and node outputs, in graph order (the graph must be sorted)."""
    out = [t for t in graph.inputs if _is_float32(t)]
    for node in graph.nodes:
        if node.op not in SKIP_OPS:
            out.extend(t for t in node.outputs if isinstance(t, gs.Variable) and _is_float32(t))
    return out


def plan_integer(graph: gs.Graph, caps: TargetCaps, exclude: Sequence[re.Pattern[str]] = ()) -> QuantPlan:
    """Every float32 activation needs a range; weights are listed for the manifest's counts. Weighted
    layers matching `exclude` cannot stay float on an integer-only device: they are listed as excluded,
    and `WidenActivations` computes them with the caps' wide activation dtype."""
    from qcompile.calibration.stats import quantizable_tensors

    names = tuple(quantizable_tensors(graph))
    weights, excluded = [], []
    for node in graph.nodes:
        if node.op in ("Conv", "Gemm", "MatMul") and len(node.inputs) > 1:
            values = constant_values(node.inputs[1])
            if values is None:
                continue
            weights.append(WeightSlot(node.name, 1, weight_axis(node, values.ndim) or 0))  # int8 either way
            if exclude and is_excluded(node, exclude):
                excluded.append(node.name)
    if excluded and caps.wide_dtype is None:
        raise UserError(f"{len(excluded)} layer(s) to take out of {caps.activation_dtype.value} activations, but this "
                        "integer-only target has no wider activation type")
    return QuantPlan(activations=names, weights=tuple(weights), biases=(), consumers=(), shared_outputs=names,
                     excluded=tuple(excluded))


class InsertQDQEverywhere(Pass):
    name = PASS_NAME
    requires = frozenset({GraphProperty.SHAPES_KNOWN})
    ensures = frozenset({GraphProperty.QDQ_PAIRED})
    preserves = frozenset({GraphProperty.NODES_NAMED, GraphProperty.SHAPES_KNOWN})

    def __init__(self, ranges: Mapping[str, TensorRange], caps: TargetCaps):
        self.ranges = ranges
        self.caps = caps
        self.fixed = {op: (scale, zero) for op, scale, zero in caps.fixed_output_qparams}
        self.float_operands = set(caps.float_operands)
        self.per_tensor = dict(caps.per_tensor_weights)

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        if self.caps.activation_dtype.bits > 8 and graph.opset < WIDE_QDQ_OPSET:
            raise_opset(graph, WIDE_QDQ_OPSET)
        graph.toposort()
        act_qp = self.activation_qparams(graph)
        constants = sum(self._quantize_constants(graph, node, act_qp) for node in list(graph.nodes)
                        if node.op not in SKIP_OPS)
        tensors = graph.tensors()
        graph_outputs = {t.name for t in graph.outputs}
        for name, qp in act_qp.items():
            if name in graph_outputs:
                self._quantize_graph_output(graph, tensors[name], qp)
            else:
                src = tensors[name]
                consumers = list(src.outputs)
                redirect_consumers(src, insert_qdq_pair(graph, src, qp, PASS_NAME), consumers)
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(modified=True, detail=f"{len(act_qp)} activations, {constants} constants")

    # --- parameters ------------------------------------------------------------------------------
    def activation_qparams(self, graph: gs.Graph) -> dict[str, QParams]:
        dtype = self.caps.activation_dtype
        out: dict[str, QParams] = {}
        for t in float_activations(graph):
            writer = producer(t)
            source = writer.inputs[0] if writer is not None and writer.inputs else None
            if writer is not None and writer.op in self.fixed:
                scale, zero = self.fixed[writer.op]
                out[t.name] = QParams(np.array(scale, np.float32), np.array(zero, dtype.numpy), dtype)
            elif writer is not None and writer.op in self.caps.same_scale_ops and source.name in out:
                out[t.name] = out[source.name]
            elif (rng := self.ranges.get(t.name) or derived_range(writer, self.ranges)) is not None:
                qp = activation_qparams(rng, dtype, symmetric=self.caps.activation_symmetric)
                pow2 = writer is not None and writer.op in self.caps.power_of_two_scale_ops
                out[t.name] = power_of_two_scale(qp) if pow2 else qp
            else:
                where = f" ({writer.op} {writer.name})" if writer is not None else " (graph input)"
                raise UserError(f"{PASS_NAME}: no calibrated range for tensor '{t.name}'{where}; the calibration "
                                "cache must cover every float tensor of this graph")
        return out

    def _quantize_constants(self, graph: gs.Graph, node: gs.Node, act_qp: dict[str, QParams]) -> int:
        count = 0
        weight_qp: QParams | None = None
        for i, t in enumerate(list(node.inputs)):
            values = constant_values(t) if t.name else None
            if values is None or values.dtype != np.float32 or (node.op, i) in self.float_operands:
                continue
            if i == 1 and node.op in ("Conv", "Gemm") and node.op not in self.per_tensor:
                qp = weight_qparams(values, weight_axis(node, values.ndim), self.caps.weight_dtype)
                weight_qp, symmetric_range = qp, True
            elif i == 1 and node.op in self.per_tensor:
                qp = _per_tensor_weight(values, self.per_tensor[node.op])
                weight_qp, symmetric_range = qp, qp.dtype.qmin < 0
            elif i == 2 and node.op in self.caps.bias_ops and weight_qp is not None and node.inputs[0].name in act_qp:
                scale = np.asarray(act_qp[node.inputs[0].name].scale * weight_qp.scale, np.float32)
                qp = QParams(scale, np.zeros(scale.shape, np.int32), QuantDType.INT32, 0 if scale.ndim else None)
                symmetric_range = False
            else:
                dtype = self.caps.constant_dtype or self.caps.activation_dtype
                qp = activation_qparams(TensorRange(float(values.min()), float(values.max())), dtype,
                                        symmetric=self.caps.activation_symmetric)
                symmetric_range = False
            shared = len(consumers(t)) > 1
            q = gs.Constant(f"{t.name}_{node.name}_quantized" if shared else f"{t.name}_quantized",
                            quantize(values, qp, symmetric_range=symmetric_range))
            node.inputs[i] = dequantize_constant(graph, q, qp, f"{node.name}_input{i}", node, PASS_NAME)
            count += 1
        return count

    def _quantize_graph_output(self, graph: gs.Graph, y: gs.Variable, qp: QParams) -> None:
        """The output keeps its name: the producer writes `<name>_float`, Q/DQ turns it back into `<name>`."""
        producer = y.inputs[0]
        pre = gs.Variable(y.name + FLOAT_OUTPUT_SUFFIX, y.dtype, y.shape)
        producer.outputs[producer.outputs.index(y)] = pre
        dq_out = insert_qdq_pair(graph, pre, qp, PASS_NAME)
        dq_out.inputs[0].outputs[0] = y


def derived_range(producer: gs.Node | None, ranges: Mapping[str, TensorRange]) -> TensorRange | None:
    """The range of an Add of a constant to a calibrated tensor, by interval arithmetic. Rewrites that
    change what a tensor holds rename it (its statistics no longer apply); see bound_attention_mask."""
    if producer is None or producer.op != "Add" or len(producer.inputs) != 2:
        return None
    for x, c in (producer.inputs, producer.inputs[::-1]):
        values = constant_values(c)
        if values is not None and values.size and x.name in ranges:
            r = ranges[x.name]
            return TensorRange(r.lo + float(values.min()), r.hi + float(values.max()))
    return None


def _per_tensor_weight(values: np.ndarray, dtype: QuantDType) -> QParams:
    """Symmetric (zero point 0, range [-qmax, qmax]) when `dtype` is signed, else asymmetric with 0 inside."""
    if dtype.qmin < 0:
        amax = float(np.abs(values).max())
        return QParams(np.array(max(amax / dtype.qmax, MIN_SCALE), np.float32), np.array(0, dtype.numpy), dtype)
    return activation_qparams(TensorRange(float(values.min()), float(values.max())), dtype, symmetric=False)
