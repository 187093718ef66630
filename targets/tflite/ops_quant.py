"""QuantizeLinear / DequantizeLinear: they become int8 tensors, not ops, wherever they can."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from qcompile.quant import QParams, QuantDType, dequantize, quantize
from qcompile.targets.tflite.builder import Quant
from qcompile.targets.tflite.layout import identity
from qcompile.targets.tflite.lower import Lowering, quantize_node_quant
from qcompile.targets.tflite.values import ConstValue, Value


def node_qparams(ctx: Lowering, node: gs.Node, dtype: np.dtype) -> QParams:
    scale = ctx.const(node.inputs[1])
    if scale is None:
        raise ctx.fail("the scale must be a constant")
    zero = ctx.const(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None
    s = np.asarray(scale.values, np.float32)
    z = np.zeros(s.shape, dtype) if zero is None else np.asarray(zero.values)
    axis = int(node.attrs.get("axis", 1)) if s.size > 1 else None  # one scale: per-tensor
    try:
        qdtype = QuantDType(np.dtype(z.dtype).name)
    except ValueError:
        raise ctx.fail(f"quantized type {z.dtype} is not supported") from None
    if axis is None:
        s, z = s.reshape(()), z.reshape(())
    return QParams(s, z, qdtype, axis)


def lower_dequantize(ctx: Lowering, node: gs.Node) -> None:
    x, out = node.inputs[0], node.outputs[0]
    c = ctx.const(x)
    if c is not None:
        qp = node_qparams(ctx, node, c.values.dtype)
        if qp.axis is not None:
            qp = QParams(qp.scale, qp.zero_point, qp.dtype, qp.axis % c.values.ndim)
        ctx.consts[out.name] = ConstValue(dequantize(np.asarray(c.values), qp), np.asarray(c.values), qp)
        return
    v = ctx.value(x)
    quant = quantize_node_quant(ctx, node)
    if quant is None or v.dtype != np.int8:
        raise ctx.fail("only per-tensor int8 DequantizeLinear of activations is supported")
    if v.quant != quant:  # an int8 graph input, or a reinterpretation with other parameters
        v = Value(v.tensor, v.shape, v.perm, v.dtype, quant) if v.quant is None else ctx.requantize(v, quant)
    ctx.bind(out, v)


def lower_quantize(ctx: Lowering, node: gs.Node) -> None:
    quant = quantize_node_quant(ctx, node)
    if quant is None:
        raise ctx.fail("only per-tensor int8 QuantizeLinear is supported (int8 activations)")
    x = node.inputs[0]
    c = ctx.const(x)
    if c is not None:
        qp = QParams(np.float32(quant.scale[0]), np.int8(quant.zero_point[0]), QuantDType.INT8)
        raw = quantize(np.asarray(c.values, np.float32), qp)
        index = ctx.constant(node.outputs[0].name, raw, quant)
        ctx.bind(node.outputs[0], Value(index, raw.shape, identity(raw.ndim), raw.dtype, quant))
        return
    ctx.bind(node.outputs[0], ctx.requantize(ctx.value(x), quant))


def weight_quant(c: ConstValue, channels: int, axis_after: int) -> Quant | None:
    """TFLite parameters for a quantized weight: symmetric int8 (zero points 0), one scale per channel."""
    qp = c.qparams
    if qp is None or qp.dtype is not QuantDType.INT8 or np.any(np.asarray(qp.zero_point) != 0):
        return None
    scale = np.asarray(qp.scale, np.float32).reshape(-1)
    if scale.size == 1:
        scale = np.repeat(scale, channels)
    if scale.size != channels:
        return None
    return Quant.of(scale, np.zeros(channels, np.int64), axis_after)


HANDLERS = {"QuantizeLinear": lower_quantize, "DequantizeLinear": lower_dequantize}
