"""Which tensors an explicit-quantization runtime (TensorRT) gets Q/DQ on: its placement rules as a plan.

TensorRT reads precision from the Q/DQ nodes alone (strongly typed networks; TensorRT 11 has no other
way) and fuses around them: DQ -> Conv/Gemm/MatMul runs as one low-precision kernel only when *both*
operands arrive through DQ, an Add fuses into the layer's epilogue only when its other (residual)
input is quantized too, and FP8 attention fuses into one kernel only with Q/DQ on Q, K, V and on the
softmax output. A half-quantized layer runs a float kernel behind extra conversions: slower than no
quantization at all, which is how INT8 diffusion engines end up slower than FP16. So this planner
quantizes whole layers or nothing:

- weighted layers chosen by the quantization level (`QuantLevel`: convs, + FFN, + QKV, + every linear,
  + attention), never those matching the family's float scopes or `--exclude`;
- a layer whose reduction (K) or output (N) width is below `min_width` stays float (low-precision
  kernels pad narrow layers and run slower than float). K is the input channels per group for a
  convolution, the reduction dimension for Gemm/MatMul; N the output channels / features;
- weights symmetric per output channel (Conv axis 0, ConvTranspose 1, Gemm 0 with transB else 1,
  MatMul the last axis of B), activations symmetric per tensor; biases stay float (TensorRT folds
  them into the kernel itself);
- the residual input of an Add fed by a quantized layer (directly, or through its bias Add or a
  scalar Mul/Div);
- FP8 attention: Q, K, V and the softmax output, for units whose head size is a multiple of 16 and
  whose head size and key count are both at least `min_width` (a cross-attention over 4 text tokens
  stays float: its batched matmuls are 4 wide).
Concat inputs are never quantized one by one, so no Concat sees inputs at different scales (the lint
checks the rule on the emitted graph either way).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import onnx_graphsurgeon as gs

from qcompile.caps import ExplicitRules, QuantLevel, TargetCaps
from qcompile.graph_io import constant_values, module_path
from qcompile.passes.fuse_attention import find_attention
from qcompile.passes.insert_qdq import QuantPlan, WeightSlot, is_excluded
from qcompile.rewrite import is_activation, producer

LAYER_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
FFN = re.compile(r"(^|\.)ff(_context)?\.net(\.|$)")
QKV = re.compile(r"(^|\.)(to_q|to_k|to_v|to_qkv|add_q_proj|add_k_proj|add_v_proj)$")
# Nodes between a quantized layer and the Add that TensorRT still fuses into the layer's epilogue.
EPILOGUE_OPS = frozenset({"Add", "Mul", "Div"})
EPILOGUE_DEPTH = 3


def weight_axis(node: gs.Node, rank: int) -> int | None:
    """The output-channel axis of a layer's constant weight (input 1)."""
    if node.op == "Conv":
        return 0
    if node.op == "ConvTranspose":
        return 1
    if node.op == "Gemm":
        return 0 if node.attrs.get("transB", 0) else 1
    if node.op == "MatMul" and rank >= 2:
        return rank - 1
    return None


def layer_widths(node: gs.Node, weight: np.ndarray) -> tuple[int, int]:
    """(K, N): the reduction width and the output width of a layer, from its weight's shape."""
    group = int(node.attrs.get("group", 1))
    if node.op == "Conv":
        return int(weight.shape[1]), int(weight.shape[0])
    if node.op == "ConvTranspose":
        return int(weight.shape[0]) // group, int(weight.shape[1]) * group
    if node.op == "Gemm" and node.attrs.get("transB", 0):
        return int(weight.shape[1]), int(weight.shape[0])
    return int(weight.shape[-2]), int(weight.shape[-1])


def layer_level(node: gs.Node) -> QuantLevel:
    """The lowest level that quantizes this weighted layer."""
    if node.op in ("Conv", "ConvTranspose"):
        return QuantLevel.CONV
    path = module_path(node)
    if FFN.search(path):
        return QuantLevel.FFN
    if QKV.search(path):
        return QuantLevel.QKV
    return QuantLevel.LINEAR


def _float32(t: gs.Tensor) -> bool:
    return t.dtype is None or np.dtype(t.dtype) == np.float32


def _last_dim(t: gs.Tensor) -> int | None:
    d = t.shape[-1] if t.shape else None
    return int(d) if isinstance(d, int | np.integer) else None


def fed_by(t: gs.Tensor, layers: set[str]) -> bool:
    """Whether `t` is a quantized layer's output, possibly through its bias Add or a scalar Mul/Div."""
    for _ in range(EPILOGUE_DEPTH + 1):
        node = producer(t)
        if node is None:
            return False
        if node.name in layers:
            return True
        if node.op not in EPILOGUE_OPS:
            return False
        constant = [i for i in node.inputs if not is_activation(i)]
        moving = [i for i in node.inputs if is_activation(i)]
        if len(constant) != 1 or len(moving) != 1 or (node.op == "Div" and node.inputs[0] is not moving[0]):
            return False
        t = moving[0]
    return False


def plan_explicit(graph: gs.Graph, caps: TargetCaps, patterns: Sequence[re.Pattern[str]]) -> QuantPlan:
    rules: ExplicitRules = caps.explicit
    activations: dict[str, None] = {}
    consumers: list[tuple[str, str]] = []
    weights: list[WeightSlot] = []
    excluded: list[str] = []
    layers: set[str] = set()

    def quantize_input(node: gs.Node, t: gs.Tensor) -> None:
        activations[t.name] = None
        consumers.append((node.name, t.name))

    for node in graph.nodes:
        if node.op not in LAYER_OPS or len(node.inputs) < 2:
            continue
        data, weight = node.inputs[0], node.inputs[1]
        w = constant_values(weight)
        if w is None:
            continue  # two activations: attention, below
        axis = weight_axis(node, w.ndim)
        if axis is None or not is_activation(data) or not _float32(data):
            continue
        if node.op == "Gemm" and node.attrs.get("transA", 0):
            continue
        k, n = layer_widths(node, w)
        if (is_excluded(node, patterns) or not rules.level.includes(layer_level(node))
                or min(k, n) < rules.min_width):
            excluded.append(node.name)
            continue
        weights.append(WeightSlot(node.name, 1, axis))
        quantize_input(node, data)
        layers.add(node.name)

    if rules.residual_adds:
        for node in graph.nodes:
            if node.op != "Add" or len(node.inputs) != 2 or not all(is_activation(t) for t in node.inputs):
                continue
            if not all(_float32(t) for t in node.inputs):
                continue
            fed = [fed_by(t, layers) for t in node.inputs]
            if fed.count(True) == 1:
                quantize_input(node, node.inputs[fed.index(False)])

    if rules.level.includes(QuantLevel.ATTENTION) and caps.activation_dtype.is_float:
        nodes = {n.name: n for n in graph.nodes}
        for unit in find_attention(graph):
            qk, av = nodes[unit.qk_matmul], nodes[unit.av_matmul]
            head, keys = _last_dim(qk.inputs[0]), _last_dim(qk.inputs[1])
            # Q.K^T reduces over the head and makes one column per key; P.V the reverse
            if (head is None or keys is None or head % rules.head_multiple
                    or min(head, keys, _last_dim(av.inputs[1]) or 0) < rules.min_width):
                excluded.extend([unit.qk_matmul, unit.av_matmul])
                continue
            if not all(_float32(t) for t in [*qk.inputs, *av.inputs]):
                continue
            for mm in (qk, av):
                for t in mm.inputs[:2]:
                    quantize_input(mm, t)
    return QuantPlan(tuple(activations), tuple(weights), (), tuple(consumers), (), tuple(excluded), ())
