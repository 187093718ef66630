"""Offline lint of a Q/DQ ONNX graph against TensorRT's explicit-quantization rules.

Run on every graph a trt build emits (each bucket's, and the one-engine graph); any violation names
the node and the rule and fails the build. Each rule is what TensorRT needs to build, or to fuse,
the quantized graph as intended (TensorRT docs, "Working with Quantized Types" / explicit
quantization; ModelOpt's ONNX quantizer and TensorRT's demo/Diffusion place Q/DQ the same way):

- `symmetric`: every QuantizeLinear/DequantizeLinear has an explicit zero point, all zeros, of type
  int8 or float8e4m3fn (TensorRT has no asymmetric or uint8 quantization; a missing zero point
  means uint8 in ONNX; there is no int32 bias quantization);
- `constant-scale`: scales are build-time constants, finite and > 0;
- `opset`: FP8 Q/DQ needs opset 19 or newer;
- `weight-per-channel`: a layer's weight is quantized per output channel on the right axis (Conv 0,
  ConvTranspose 1, Gemm 0 with transB else 1, MatMul the last axis of B);
- `activation-per-tensor`: a Q on an activation has one scale;
- `q-dq-pair`: every Q output is read by DequantizeLinear only;
- `both-inputs`: a Conv/ConvTranspose/Gemm/MatMul has both operands quantized or neither;
- `residual-add`: an Add fed by a quantized layer has its other input quantized (else it cannot fuse
  into the layer's epilogue);
- `concat-scale`: a Concat whose inputs are quantized has them all quantized at one scale and type;
- `narrow-layer`: no quantized layer with K or N below the minimum width;
- `float-layer`: no quantized layer matches the float scopes (the family's defaults, --exclude);
- `attention-head`: a quantized attention batched matmul has a head size that is a multiple of 16.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from qcompile.errors import UserError
from qcompile.graph_io import constant_values, module_path
from qcompile.passes.plan_explicit import LAYER_OPS, fed_by, layer_widths, weight_axis
from qcompile.rewrite import is_activation, producer

RESCALE_PREFIX = "qcompile_rescale"  # tensors of the one-engine bucket graph's rescale (targets/tensorrt/buckets.py)


class Rule(enum.Enum):
    SYMMETRIC = "symmetric"
    CONSTANT_SCALE = "constant-scale"
    OPSET = "opset"
    WEIGHT_PER_CHANNEL = "weight-per-channel"
    ACTIVATION_PER_TENSOR = "activation-per-tensor"
    Q_DQ_PAIR = "q-dq-pair"
    BOTH_INPUTS = "both-inputs"
    RESIDUAL_ADD = "residual-add"
    CONCAT_SCALE = "concat-scale"
    NARROW_LAYER = "narrow-layer"
    FLOAT_LAYER = "float-layer"
    ATTENTION_HEAD = "attention-head"


@dataclass(frozen=True)
class Violation:
    node: str
    rule: Rule
    detail: str

    def __str__(self) -> str:
        return f"node '{self.node}' breaks rule {self.rule.value}: {self.detail}"


@dataclass(frozen=True)
class LintRules:
    float_scopes: tuple[str, ...] = ()  # module-path / node-name regexes that must stay float
    float_layers: frozenset[str] = frozenset()  # node names the plan kept float
    min_width: int = 16
    head_multiple: int = 16
    residual_adds: bool = True
    # Accept DQ -> Mul(bucket rescale) -> layer as a quantized operand (the one-engine graph's INPUT form).
    rescale_before_layers: bool = True


def _quant_dtype_ok(dtype: np.dtype) -> bool:
    return dtype == np.dtype(np.int8) or dtype.name == "float8_e4m3fn"


def dequantized_by(t: gs.Tensor, through_rescale: bool = True) -> gs.Node | None:
    """The DequantizeLinear `t` comes from: directly, or through the one-engine graph's rescale Mul."""
    node = producer(t)
    if through_rescale and node is not None and node.op == "Mul" \
            and any(i.name.startswith(RESCALE_PREFIX) for i in node.inputs):
        node = next((producer(i) for i in node.inputs if not i.name.startswith(RESCALE_PREFIX)), None)
    return node if node is not None and node.op == "DequantizeLinear" else None


def _scale_values(node: gs.Node) -> np.ndarray | None:
    return constant_values(node.inputs[1]) if len(node.inputs) > 1 else None


def _check_qdq(node: gs.Node, out: list[Violation]) -> bool:
    """Zero point and scale rules of one Q/DQ node; True when it holds float8."""
    if len(node.inputs) < 3 or not node.inputs[2].name:
        out.append(Violation(node.name, Rule.SYMMETRIC, "no zero point (ONNX then means uint8)"))
        return False
    zero = constant_values(node.inputs[2])
    dtype = np.dtype(node.inputs[2].dtype) if zero is None else zero.dtype
    if not _quant_dtype_ok(dtype):
        out.append(Violation(node.name, Rule.SYMMETRIC, f"zero point of type {dtype.name}, not int8 or float8e4m3fn"))
    elif zero is None or np.any(zero.astype(np.float32) != 0):
        out.append(Violation(node.name, Rule.SYMMETRIC, "zero point is not a constant 0"))
    scale = _scale_values(node)
    if scale is None:
        out.append(Violation(node.name, Rule.CONSTANT_SCALE, "the scale is computed at run time"))
    elif not (np.all(np.isfinite(scale)) and np.all(scale > 0)):
        out.append(Violation(node.name, Rule.CONSTANT_SCALE, f"scale not finite and > 0 (min {np.min(scale)})"))
    return dtype.name == "float8_e4m3fn"


def _check_weight(layer: gs.Node, dq: gs.Node, out: list[Violation]) -> None:
    values = constant_values(dq.inputs[0])
    if values is None:  # Q -> DQ on a float weight: the weight is the Q's input
        q = producer(dq.inputs[0])
        values = constant_values(q.inputs[0]) if q is not None and q.op == "QuantizeLinear" else None
    if values is None:
        return
    expected = weight_axis(layer, values.ndim)
    axis = dq.attrs.get("axis", 1)
    axis = axis + values.ndim if axis < 0 else axis
    scale = _scale_values(dq)
    channels = values.shape[expected] if expected is not None else None
    if scale is None or scale.size != channels or (scale.size > 1 and axis != expected):
        out.append(Violation(dq.name, Rule.WEIGHT_PER_CHANNEL,
                             f"weight of {layer.op} '{layer.name}' needs {channels} scales on axis {expected}, "
                             f"has {None if scale is None else scale.size} on axis {axis}"))


def lint(graph: gs.Graph, rules: LintRules) -> list[Violation]:
    out: list[Violation] = []
    patterns = [re.compile(p) for p in rules.float_scopes]
    has_fp8 = False
    for node in graph.nodes:
        if node.op in ("QuantizeLinear", "DequantizeLinear"):
            has_fp8 |= _check_qdq(node, out)
        if node.op == "QuantizeLinear":
            scale = _scale_values(node)
            if is_activation(node.inputs[0]) and scale is not None and scale.size != 1:
                out.append(Violation(node.name, Rule.ACTIVATION_PER_TENSOR, f"{scale.size} scales on an activation"))
            readers = node.outputs[0].outputs
            if not readers or any(r.op != "DequantizeLinear" for r in readers):
                out.append(Violation(node.name, Rule.Q_DQ_PAIR, "its output is read by something else than a "
                                                                "DequantizeLinear"))
    if has_fp8 and (graph.opset or 0) < 19:
        out.append(Violation(graph.name or "graph", Rule.OPSET, f"FP8 Q/DQ needs opset >= 19, the graph has "
                                                                f"{graph.opset}"))
    quantized: set[str] = set()
    for node in graph.nodes:
        if node.op not in LAYER_OPS or len(node.inputs) < 2:
            continue
        dqs = [dequantized_by(t, rules.rescale_before_layers) for t in node.inputs[:2]]
        if (dqs[0] is None) != (dqs[1] is None):
            half = "input" if dqs[0] is None else "weight"
            out.append(Violation(node.name, Rule.BOTH_INPUTS, f"only one operand quantized (the {half} is float)"))
            continue
        if dqs[0] is None:
            continue
        quantized.add(node.name)
        weight = constant_values(dqs[1].inputs[0])
        if weight is None and producer(dqs[1].inputs[0]) is not None:
            q = producer(dqs[1].inputs[0])
            weight = constant_values(q.inputs[0]) if q.op == "QuantizeLinear" else None
        if weight is not None:
            _check_weight(node, dqs[1], out)
            k, n = layer_widths(node, weight)
        else:  # two activations: an attention batched matmul
            a, b = node.inputs[0].shape, node.inputs[1].shape
            k = a[-1] if a else None
            n = b[-1] if b else None
            head = k if _is_qk(node) else n
            if not isinstance(head, int | np.integer) or head % rules.head_multiple:
                out.append(Violation(node.name, Rule.ATTENTION_HEAD,
                                     f"head size {head} is not a multiple of {rules.head_multiple}"))
        if all(isinstance(d, int | np.integer) for d in (k, n)) and min(k, n) < rules.min_width:
            out.append(Violation(node.name, Rule.NARROW_LAYER, f"K={k}, N={n}: below {rules.min_width}, keep it float"))
        path = module_path(node)
        if node.name in rules.float_layers or any(p.search(node.name) or (path and p.search(path)) for p in patterns):
            out.append(Violation(node.name, Rule.FLOAT_LAYER, f"matches a float scope ({path or node.name})"))
    for node in graph.nodes:
        if node.op == "Add" and rules.residual_adds and len(node.inputs) == 2 \
                and all(is_activation(t) for t in node.inputs):
            fed = [fed_by(t, quantized) for t in node.inputs]
            if fed.count(True) == 1 and dequantized_by(node.inputs[fed.index(False)]) is None:
                residual = node.inputs[fed.index(False)].name
                out.append(Violation(node.name, Rule.RESIDUAL_ADD,
                                     f"residual input '{residual}' is float: the Add cannot fuse into the layer"))
        if node.op == "Concat":
            dqs = [dequantized_by(t) for t in node.inputs]
            if any(dqs):
                params = {(np.dtype(d.inputs[2].dtype).name, float(np.ravel(_scale_values(d))[0]))
                          if d is not None and _scale_values(d) is not None else None for d in dqs}
                if None in params or len(params) > 1:
                    out.append(Violation(node.name, Rule.CONCAT_SCALE,
                                         f"inputs quantized differently: {sorted(map(str, params))}"))
    return out


def _is_qk(node: gs.Node) -> bool:
    """The Q·K^T matmul of attention (its output goes towards a Softmax), not the P·V one."""
    frontier, seen = list(node.outputs[0].outputs), 0
    while frontier and seen < 8:
        n = frontier.pop(0)
        seen += 1
        if n.op == "Softmax":
            return True
        if n.op in ("Mul", "Div", "Add", "Where", "Cast", "QuantizeLinear", "DequantizeLinear"):
            frontier.extend(n.outputs[0].outputs)
    return False


def check(graphs: Sequence[tuple[str, gs.Graph]], rules: LintRules) -> int:
    """Lint every (label, graph); raise UserError naming the first violations; returns the nodes checked."""
    found: list[str] = []
    for label, graph in graphs:
        found += [f"{label}: {v}" for v in lint(graph, rules)]
    if found:
        more = f" (and {len(found) - 3} more)" if len(found) > 3 else ""
        raise UserError(f"TensorRT lint: {len(found)} violation(s): " + "; ".join(found[:3]) + more)
    return sum(len(g.nodes) for _, g in graphs)
