"""Elementwise ops: they run in whatever layout their inputs already have (no transposes of their own).

Binary ops broadcast like numpy once every operand has the output's rank, so constants are reshaped
and permuted in numpy and lower-rank activations get a RESHAPE. Int8 kernels are used where TFLite
has them and the Q/DQ graph quantizes the output; LOGISTIC and TANH only with the fixed output
parameters their int8 kernels require (1/256, -128 and 1/128, 0).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from qcompile.targets.tflite.builder import Quant
from qcompile.targets.tflite.lower import Lowering

BINARY = {
    "Add": ("ADD", "AddOptions"), "Sub": ("SUB", "SubOptions"), "Mul": ("MUL", "MulOptions"),
    "Div": ("DIV", "DivOptions"), "Pow": ("POW", "PowOptions"), "Max": ("MAXIMUM", "MaximumMinimumOptions"),
    "Min": ("MINIMUM", "MaximumMinimumOptions"), "Where": ("SELECT_V2", "SelectV2Options"),
}
UNARY = {
    "Sigmoid": "LOGISTIC", "Tanh": "TANH", "Relu": "RELU", "Sqrt": "SQRT", "Sin": "SIN", "Cos": "COS",
    "Exp": "EXP", "Log": "LOG", "Neg": "NEG", "Abs": "ABS", "Floor": "FLOOR", "Ceil": "CEIL", "Gelu": "GELU",
}
INT8_BINARY = frozenset({"ADD", "SUB", "MUL"})
# Unary int8 kernels, with the output parameters they insist on (None: any).
INT8_UNARY: dict[str, Quant | None] = {
    "LOGISTIC": Quant.per_tensor(1 / 256, -128),
    "TANH": Quant.per_tensor(1 / 128, 0),
    "GELU": None,
    "RELU": None,
}


def _int8_inputs(ctx: Lowering, node: gs.Node) -> bool:
    for t in node.inputs:
        c = ctx.const(t)
        if c is not None:
            if not (c.quantized and c.qparams.axis is None and c.raw.dtype == np.int8):
                return False
        elif ctx.value(t).quant is None:
            return False
    return True


def lower_binary(ctx: Lowering, node: gs.Node) -> None:
    code, options = BINARY[node.op]
    out_t = node.outputs[0]
    shape = ctx.shape(out_t)
    rank = len(shape)
    if node.op == "Pow":
        exponent = ctx.const(node.inputs[1])
        if exponent is not None and exponent.values.size == 1 and float(exponent.values.reshape(-1)[0]) in (0.5, 2.0):
            x = ctx.float_value(node.inputs[0])
            out = ctx.like(x, out_t.name, shape=shape)
            if float(exponent.values.reshape(-1)[0]) == 2.0:
                ctx.op("MUL", [x, x], [out], "MulOptions")
            else:
                ctx.op("SQRT", [x], [out])
            ctx.bind(out_t, out)
            return
    activations = [t for t in node.inputs if ctx.const(t) is None]
    perm = ctx.common_perm(activations, rank)
    out_q = ctx.out_quant(node) if code in INT8_BINARY else None
    int8 = out_q is not None and _int8_inputs(ctx, node)
    operands = [ctx.operand(t, rank, perm, quantized=int8) for t in node.inputs]
    dtype = np.int8 if int8 else _result_dtype(ctx, node, operands)
    out = ctx.new_value(out_t.name, shape, perm, dtype, out_q if int8 else None)
    ctx.op(code, operands, [out], options)
    ctx.bind(out_t, out)


def _result_dtype(ctx: Lowering, node: gs.Node, operands) -> np.dtype:
    if node.op == "Where":
        return operands[1].dtype
    return operands[0].dtype


def lower_unary(ctx: Lowering, node: gs.Node) -> None:
    code = UNARY[node.op]
    x = ctx.value(node.inputs[0])
    out_q = ctx.out_quant(node)
    int8 = (x.quant is not None and out_q is not None and code in INT8_UNARY
            and INT8_UNARY[code] in (None, out_q))
    if not int8:
        x, out_q = ctx.float_value(x), None
    out = ctx.like(x, node.outputs[0].name, shape=ctx.shape(node.outputs[0]), quant=out_q)
    if code == "GELU":
        approximate = node.attrs.get("approximate", "none")
        approximate = approximate.decode() if isinstance(approximate, bytes) else approximate
        ctx.op(code, [x], [out], "GeluOptions", approximate=approximate == "tanh")
    else:
        ctx.op(code, [x], [out])
    ctx.bind(node.outputs[0], out)


def lower_reciprocal(ctx: Lowering, node: gs.Node) -> None:
    x = ctx.float_value(node.inputs[0])
    one = ctx.constant(ctx.name("one"), np.ones((1,) * x.rank, np.float32))
    out = ctx.like(x, node.outputs[0].name)
    ctx.op("DIV", [one, x], [out], "DivOptions")
    ctx.bind(node.outputs[0], out)


def lower_cast(ctx: Lowering, node: gs.Node) -> None:
    """CAST; float64 is computed as float32 (few TFLite kernels take doubles; exporters use them for RoPE)."""
    to = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(int(node.attrs["to"])))
    to = np.dtype(np.float32) if to == np.float64 else to
    x = ctx.float_value(node.inputs[0])
    if x.dtype == to:
        ctx.bind(node.outputs[0], x)
        return
    out = ctx.like(x, node.outputs[0].name, dtype=to, quant=None)
    ctx.op("CAST", [x], [out])
    ctx.bind(node.outputs[0], out)


def lower_clip(ctx: Lowering, node: gs.Node) -> None:
    x = ctx.float_value(node.inputs[0])
    bounds = []
    for i, name in ((1, "min"), (2, "max")):
        if len(node.inputs) > i and node.inputs[i].name:
            c = ctx.const(node.inputs[i])
            if c is None:
                raise ctx.fail("Clip bounds must be constant")
            bounds.append((name, float(c.values.reshape(-1)[0])))
    out = x
    for name, bound in bounds:
        limit = ctx.constant(ctx.name(name), np.full((1,) * x.rank, bound, np.float32))
        nxt = ctx.like(x, node.outputs[0].name if name == bounds[-1][0] else ctx.name(name + "_clipped"))
        ctx.op("MAXIMUM" if name == "min" else "MINIMUM", [out, limit], [nxt], "MaximumMinimumOptions")
        out = nxt
    ctx.bind(node.outputs[0], out)


def lower_isnan(ctx: Lowering, node: gs.Node) -> None:
    """NaN is the one value not equal to itself."""
    x = ctx.float_value(node.inputs[0])
    out = ctx.like(x, node.outputs[0].name, dtype=np.bool_, quant=None)
    ctx.op("NOT_EQUAL", [x, x], [out])
    ctx.bind(node.outputs[0], out)


HANDLERS = {
    **{op: lower_binary for op in BINARY},
    **{op: lower_unary for op in UNARY},
    "Reciprocal": lower_reciprocal,
    "Cast": lower_cast,
    "Clip": lower_clip,
    "IsNaN": lower_isnan,
}
