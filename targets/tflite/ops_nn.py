"""Conv, Gemm and MatMul: CONV_2D / DEPTHWISE_CONV_2D, FULLY_CONNECTED and BATCH_MATMUL.

The int8 form is used when the Q/DQ graph says so: the activation arrives through a DequantizeLinear,
the weight is a per-channel symmetric int8 constant, the bias (if any) an int32 constant with scale
s_in * s_w, and the only reader of the output is a QuantizeLinear. Otherwise the op runs in float
with the dequantized weights, which is exactly what the Q/DQ graph computes.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs

from qcompile.targets.tflite.builder import Quant
from qcompile.targets.tflite.layout import NHWC, after_transpose, identity
from qcompile.targets.tflite.lower import FLOAT, Lowering
from qcompile.targets.tflite.ops_quant import weight_quant
from qcompile.targets.tflite.values import ConstValue, Value

# TFLite checks that a bias scale equals input_scale * weight_scale to this relative tolerance.
BIAS_SCALE_RTOL = 1e-6


def _optional(node: gs.Node, i: int) -> gs.Tensor | None:
    return node.inputs[i] if len(node.inputs) > i and node.inputs[i].name else None


def _int8_bias(ctx: Lowering, bias: gs.Tensor | None, in_q: Quant, w_q: Quant, channels: int, scale: float = 1.0):
    """The int32 bias TFLite's integer kernels need (scale s_in * s_w per channel, zero point 0)."""
    want = np.float32(in_q.scale[0]) * np.asarray(w_q.scale, np.float32)
    quant = Quant.of(want, np.zeros(channels, np.int64))
    if bias is None:
        return ctx.constant(ctx.name("bias"), np.zeros(channels, np.int32), quant)
    c = ctx.const(bias)
    if c is None:
        return None
    if c.quantized and c.qparams.axis in (0, None):
        have = np.broadcast_to(np.asarray(c.qparams.scale, np.float32).reshape(-1), (channels,))
        if np.all(np.abs(have - want) <= BIAS_SCALE_RTOL * np.minimum(have, want)) and c.raw.dtype == np.int32:
            return ctx.constant(bias.name, np.broadcast_to(c.raw.reshape(-1), (channels,)).astype(np.int32), quant)
    values = np.broadcast_to(np.asarray(c.values, np.float64).reshape(-1) * scale, (channels,))
    q = np.clip(np.rint(values / want), -(2**31) + 1, 2**31 - 1).astype(np.int32)
    return ctx.constant(bias.name + "/int32", q, quant)


def _float_bias(ctx: Lowering, bias: gs.Tensor | None, channels: int, scale: float = 1.0) -> int:
    if bias is None:
        return ctx.constant(ctx.name("bias"), np.zeros(channels, np.float32))
    values = np.asarray(ctx.const(bias).values, np.float32).reshape(-1) * np.float32(scale)
    return ctx.constant(bias.name, np.broadcast_to(values, (channels,)).astype(np.float32))


def conv_padding(ctx: Lowering, node: gs.Node, in_hw, k_hw, strides, dilations, out_hw) -> tuple[str, list[int] | None]:
    """TFLite padding for ONNX pads: 'SAME' or 'VALID', or 'VALID' after an explicit PAD (returned)."""
    n = len(in_hw)
    auto = node.attrs.get("auto_pad", "NOTSET")
    if isinstance(auto, bytes):
        auto = auto.decode()
    same = []
    for i in range(n):
        eff = (k_hw[i] - 1) * dilations[i] + 1
        total = max((math.ceil(in_hw[i] / strides[i]) - 1) * strides[i] + eff - in_hw[i], 0)
        same.append((total // 2, total - total // 2))
    if auto == "VALID":
        return "VALID", None
    if auto == "SAME_UPPER":
        return "SAME", None
    if auto == "SAME_LOWER":
        pads = [s[1] for s in same] + [s[0] for s in same]
    else:
        pads = [int(p) for p in node.attrs.get("pads", [0] * 2 * n)]
    if not any(pads):
        return "VALID", None
    pairs = [(pads[i], pads[i + n]) for i in range(n)]
    if pairs == same and all(out_hw[i] == math.ceil(in_hw[i] / strides[i]) for i in range(n)):
        return "SAME", None
    return "VALID", pads


def lower_conv(ctx: Lowering, node: gs.Node) -> None:
    x, w_t, b_t = node.inputs[0], node.inputs[1], _optional(node, 2)
    w = ctx.const(w_t)
    if w is None:
        raise ctx.fail("Conv weights must be constant")
    if w.values.ndim != 4:
        raise ctx.fail(f"only 2-D convolutions are supported (weight rank {w.values.ndim})")
    if b_t is not None and ctx.const(b_t) is None:
        raise ctx.fail("Conv bias must be constant")
    c_out, c_in_g, kh, kw = w.values.shape
    in_shape, out_shape = ctx.shape(x), ctx.shape(node.outputs[0])
    group = int(node.attrs.get("group", 1))
    depthwise = group > 1 and group == in_shape[1] and c_in_g == 1
    if group > 1 and not depthwise:
        raise ctx.fail(f"grouped convolution (group={group}) other than depthwise is not supported")
    strides = [int(s) for s in node.attrs.get("strides", [1, 1])]
    dilations = [int(d) for d in node.attrs.get("dilations", [1, 1])]
    padding, pads = conv_padding(ctx, node, in_shape[2:], (kh, kw), strides, dilations, out_shape[2:])

    xv = ctx.value(x)
    out_q = ctx.out_quant(node)
    w_axis = 3 if depthwise else 0
    w_q = weight_quant(w, c_out, w_axis) if w.quantized and w.qparams.axis in (0, None) else None
    bias = None
    if out_q is not None and xv.quant is not None and w_q is not None:
        bias = _int8_bias(ctx, b_t, xv.quant, w_q, c_out)
    if bias is not None:
        data, quant, dtype = w.raw, w_q, np.int8
    else:
        xv, data, quant, dtype, out_q = ctx.float_value(xv), np.asarray(w.values, np.float32), None, FLOAT, None
        bias = _float_bias(ctx, b_t, c_out)
    xv = ctx.to_layout(xv, NHWC)
    if pads is not None:
        padded = (in_shape[0], in_shape[1], in_shape[2] + pads[0] + pads[2], in_shape[3] + pads[1] + pads[3])
        pv = ctx.like(xv, ctx.name("padded"), shape=padded)
        paddings = [[0, 0], [pads[0], pads[2]], [pads[1], pads[3]], [0, 0]]
        ctx.op("PAD", [xv, ctx.constant(ctx.name("paddings"), np.asarray(paddings, np.int32))], [pv])
        xv = pv
    if depthwise:
        kernel = np.transpose(data.reshape(c_out, kh, kw), (1, 2, 0))[None]
    else:
        kernel = np.transpose(data, (0, 2, 3, 1))
    w_index = ctx.constant(w_t.name + "/tflite", np.ascontiguousarray(kernel), quant)
    out = ctx.new_value(node.outputs[0].name, out_shape, NHWC, dtype, out_q)
    common = dict(padding=padding_code(padding), strideW=strides[1], strideH=strides[0],
                  dilationWFactor=dilations[1], dilationHFactor=dilations[0])
    if depthwise:
        ctx.op("DEPTHWISE_CONV_2D", [xv, w_index, bias], [out], "DepthwiseConv2DOptions",
               depthMultiplier=c_out // in_shape[1], **common)
    else:
        ctx.op("CONV_2D", [xv, w_index, bias], [out], "Conv2DOptions", **common)
    ctx.bind(node.outputs[0], out)


def padding_code(name: str) -> int:
    return {"SAME": 0, "VALID": 1}[name]  # tflite.Padding


def fully_connected(ctx: Lowering, node: gs.Node, a: Value, weight: ConstValue, w_name: str, *,
                    k_axis: int, bias: gs.Tensor | None = None, alpha: float = 1.0, beta: float = 1.0) -> Value:
    """FULLY_CONNECTED of `a` (any rank, contracted on its last ONNX axis) with a 2-D constant weight.

    `k_axis` is the weight's contracted axis (0 for a MatMul [K, N] weight, 1 for Gemm with transB).
    The output keeps the input's stored layout, as long as the contracted axis is stored last.
    """
    n = weight.values.shape[1 - k_axis]
    out_shape = ctx.shape(node.outputs[0])
    if a.perm[-1] != a.rank - 1:
        a = ctx.to_layout(a, identity(a.rank))
    out_q = ctx.out_quant(node)
    w_q = weight_quant(weight, n, 0) if weight.quantized and weight.qparams.axis in (1 - k_axis, None) else None
    if out_q is not None and a.quant is not None and w_q is not None:
        if alpha != 1.0:  # folded into the weight scales: exact
            w_q = Quant(tuple(float(np.float32(s * alpha)) for s in w_q.scale), w_q.zero_point, 0)
        kernel = weight.raw if k_axis == 1 else weight.raw.T
        w_index = ctx.constant(w_name + "/tflite", np.ascontiguousarray(kernel), w_q)
        b_index = _int8_bias(ctx, bias, a.quant, w_q, n, beta) if bias is not None else None
        out = ctx.new_value(node.outputs[0].name, out_shape, a.perm, np.int8, out_q)
    else:
        a = ctx.float_value(a)
        kernel = np.asarray(weight.values, np.float32) * np.float32(alpha)
        kernel = kernel if k_axis == 1 else kernel.T
        w_index = ctx.constant(w_name + "/tflite", np.ascontiguousarray(kernel))
        b_index = _float_bias(ctx, bias, n, beta) if bias is not None else None
        out = ctx.new_value(node.outputs[0].name, out_shape, a.perm, FLOAT)
    ctx.op("FULLY_CONNECTED", [a, w_index, b_index], [out], "FullyConnectedOptions",
           keepNumDims=a.rank != 2)
    return out


def lower_gemm(ctx: Lowering, node: gs.Node) -> None:
    a_t, b_t, c_t = node.inputs[0], node.inputs[1], _optional(node, 2)
    b = ctx.const(b_t)
    if b is None:
        raise ctx.fail("Gemm needs a constant B")
    a = ctx.value(a_t)
    if node.attrs.get("transA", 0):
        a = Value(a.tensor, a.shape[::-1], after_transpose(a.perm, (1, 0)), a.dtype, a.quant)
    alpha, beta = float(node.attrs.get("alpha", 1.0)), float(node.attrs.get("beta", 1.0))
    k_axis = 1 if node.attrs.get("transB", 0) else 0
    n = b.values.shape[1 - k_axis]
    bias_ok = c_t is not None and ctx.const(c_t) is not None and ctx.const(c_t).values.size in (1, n)
    out = fully_connected(ctx, node, a, b, b_t.name, k_axis=k_axis, bias=c_t if bias_ok else None,
                          alpha=alpha, beta=beta)
    if c_t is not None and not bias_ok:  # a bias that is an activation, or a full [M, N] matrix
        out = ctx.float_value(out)
        c = ctx.operand(c_t, 2, out.perm)
        if beta != 1.0:
            raise ctx.fail("Gemm with beta != 1 and a non-constant C is not supported")
        summed = ctx.like(out, node.outputs[0].name + "/plus_c")
        ctx.op("ADD", [out, c], [summed], "AddOptions")
        out = summed
    ctx.bind(node.outputs[0], out)


def _bmm_operand(ctx: Lowering, v: Value) -> tuple[Value, bool]:
    """`v` stored with its batch axes in order and its last two axes in order (False) or swapped (True)."""
    base = identity(v.rank)
    swapped = base[:-2] + (v.rank - 1, v.rank - 2)
    if v.perm == base:
        return v, False
    if v.perm == swapped:
        return v, True
    return ctx.to_layout(v, base), False


def lower_matmul(ctx: Lowering, node: gs.Node) -> None:
    a_t, b_t = node.inputs
    b = ctx.const(b_t)
    if b is not None and b.values.ndim == 2 and ctx.const(a_t) is None:
        a = ctx.value(a_t)
        if a.rank == 1:
            raise ctx.fail("MatMul of a 1-D input is not supported")
        ctx.bind(node.outputs[0], fully_connected(ctx, node, a, b, b_t.name, k_axis=0))
        return
    out_shape = ctx.shape(node.outputs[0])
    a, b_v = ctx.value(a_t), ctx.value(b_t)
    if min(a.rank, b_v.rank) < 2 or max(a.rank, b_v.rank) > 5:
        raise ctx.fail("BATCH_MATMUL needs inputs of rank 2 to 5")
    out_q = ctx.out_quant(node)
    if out_q is None or a.quant is None or b_v.quant is None:
        a, b_v, out_q = ctx.float_value(a), ctx.float_value(b_v), None
    a, adj_x = _bmm_operand(ctx, a)
    b_v, adj_y = _bmm_operand(ctx, b_v)
    out = ctx.new_value(node.outputs[0].name, out_shape, identity(len(out_shape)),
                        np.int8 if out_q else FLOAT, out_q)
    ctx.op("BATCH_MATMUL", [a, b_v], [out], "BatchMatMulOptions", adjX=adj_x, adjY=adj_y)
    ctx.bind(node.outputs[0], out)


HANDLERS = {"Conv": lower_conv, "Gemm": lower_gemm, "MatMul": lower_matmul}
