"""Data-movement ops. They commute with dequantization, so they run on int8 values unchanged, and
most of them only re-describe the stored layout (Transpose never moves data here)."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from qcompile.targets.tflite.layout import after_reshape, after_transpose, identity, invert
from qcompile.targets.tflite.lower import Lowering
from qcompile.targets.tflite.values import Value


def lower_reshape(ctx: Lowering, node: gs.Node) -> None:
    x = ctx.value(node.inputs[0])
    out_t = node.outputs[0]
    shape = ctx.shape(out_t)
    perm = after_reshape(x.shape, x.perm, shape)
    if perm is None:
        x = ctx.to_layout(x, identity(x.rank))
        perm = identity(len(shape))
    ctx.bind(out_t, ctx.view(x, shape, perm, out_t.name))


def lower_transpose(ctx: Lowering, node: gs.Node) -> None:
    x = ctx.value(node.inputs[0])
    onnx_perm = [int(p) for p in node.attrs.get("perm", list(range(x.rank))[::-1])]
    shape = tuple(x.shape[p] for p in onnx_perm)
    ctx.bind(node.outputs[0], Value(x.tensor, shape, after_transpose(x.perm, onnx_perm), x.dtype, x.quant))


def lower_einsum(ctx: Lowering, node: gs.Node) -> None:
    """Only the one-input permutations exporters write for Transpose (e.g. 'nhwpqc->nchpwq')."""
    equation = node.attrs["equation"]
    equation = equation.decode() if isinstance(equation, bytes) else equation
    lhs, _, rhs = equation.replace(" ", "").partition("->")
    if len(node.inputs) != 1 or "," in lhs or "." in lhs or sorted(lhs) != sorted(rhs) or len(set(lhs)) != len(lhs):
        raise ctx.fail(f"Einsum '{equation}' is not a permutation; only permutations are supported")
    x = ctx.value(node.inputs[0])
    onnx_perm = [lhs.index(c) for c in rhs]
    shape = tuple(x.shape[p] for p in onnx_perm)
    ctx.bind(node.outputs[0], Value(x.tensor, shape, after_transpose(x.perm, onnx_perm), x.dtype, x.quant))


def lower_identity(ctx: Lowering, node: gs.Node) -> None:
    ctx.bind(node.outputs[0], ctx.value(node.inputs[0]))


def lower_concat(ctx: Lowering, node: gs.Node) -> None:
    out_t = node.outputs[0]
    shape = ctx.shape(out_t)
    rank = len(shape)
    axis = int(node.attrs["axis"]) % rank
    activations = [t for t in node.inputs if ctx.const(t) is None]
    perm = ctx.common_perm(activations, rank)
    values = [ctx.value(t) for t in activations]
    quants = {v.quant for v in values}
    out_q = ctx.out_quant(node)
    int8 = len(activations) == len(node.inputs) and None not in quants and (len(quants) == 1 or out_q is not None)
    if int8:
        out_q = out_q if out_q is not None else values[0].quant
        operands = [ctx.requantize(ctx.to_layout(v, perm), out_q) for v in values]
    else:
        out_q = None
        operands = [ctx.operand(t, rank, perm) for t in node.inputs]
    out = ctx.new_value(out_t.name, shape, perm, operands[0].dtype, out_q)
    ctx.op("CONCATENATION", operands, [out], "ConcatenationOptions", axis=invert(perm)[axis])
    ctx.bind(out_t, out)


def lower_split(ctx: Lowering, node: gs.Node) -> None:
    """One SLICE per output: XNNPACK delegates SLICE but not SPLIT_V, and each op it does not take
    splits the delegated graph (GEGLU's chunk made 7 of the reference model's 10 partitions)."""
    x = ctx.value(node.inputs[0])
    axis = int(node.attrs.get("axis", 0)) % x.rank
    stored_axis = invert(x.perm)[axis]
    begin = 0
    for t in node.outputs:
        out = ctx.like(x, t.name, shape=ctx.shape(t))
        starts = [0] * x.rank
        starts[stored_axis] = begin
        _slice(ctx, x, out, starts, list(out.stored_shape), t.name)
        ctx.bind(t, out)
        begin += ctx.shape(t)[axis]


def _slice(ctx: Lowering, x: Value, out: Value, begin: list[int], size: list[int], name: str) -> None:
    """SLICE with stored-layout begin and size."""
    ctx.op("SLICE", [x, ctx.int32(name + "/begin", begin), ctx.int32(name + "/size", size)], [out])


def lower_slice(ctx: Lowering, node: gs.Node) -> None:
    x = ctx.value(node.inputs[0])
    starts, ends = ctx.const_ints(node.inputs[1]), ctx.const_ints(node.inputs[2])
    axes = ctx.const_ints(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3].name else list(range(len(starts)))
    steps = ctx.const_ints(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4].name else [1] * len(starts)
    begin, end, stride = [0] * x.rank, list(x.shape), [1] * x.rank
    for s, e, a, st in zip(starts, ends, axes, steps, strict=True):
        a %= x.rank
        dim = x.shape[a]
        if st <= 0:
            raise ctx.fail("Slice with non-positive steps is not supported")
        begin[a] = min(max(s + dim if s < 0 else s, 0), dim)
        end[a] = min(max(e + dim if e < 0 else e, 0), dim)
        stride[a] = st
    out_t = node.outputs[0]
    out = ctx.like(x, out_t.name, shape=ctx.shape(out_t))
    if all(st == 1 for st in stride):  # SLICE: what XNNPACK delegates
        _slice(ctx, x, out, [begin[p] for p in x.perm], list(out.stored_shape), ctx.name("slice"))
        ctx.bind(out_t, out)
        return
    ctx.op("STRIDED_SLICE", [x, ctx.int32(ctx.name("begin"), [begin[p] for p in x.perm]),
                             ctx.int32(ctx.name("end"), [end[p] for p in x.perm]),
                             ctx.int32(ctx.name("strides"), [stride[p] for p in x.perm])],
           [out], "StridedSliceOptions")
    ctx.bind(out_t, out)


def lower_squeeze_like(ctx: Lowering, node: gs.Node) -> None:
    """Squeeze, Unsqueeze, Flatten: a Reshape as far as storage is concerned."""
    lower_reshape(ctx, node)


def lower_gather(ctx: Lowering, node: gs.Node) -> None:
    data_t, idx_t = node.inputs
    out_t = node.outputs[0]
    shape = ctx.shape(out_t)
    axis = int(node.attrs.get("axis", 0))
    idx_c = ctx.const(idx_t)
    if ctx.const(data_t) is not None:
        data = ctx.value(data_t)  # an embedding table: float constant
        axis %= data.rank
        indices = ctx.to_layout(ctx.value(idx_t), identity(len(ctx.shape(idx_t)))) if idx_c is None else \
            ctx.const_operand(idx_t.name, _wrap(idx_c.values, data.shape[axis]), idx_c.values.ndim,
                              identity(idx_c.values.ndim))
        out = ctx.new_value(out_t.name, shape, identity(len(shape)), data.dtype)
        ctx.op("GATHER", [data, indices], [out], "GatherOptions", axis=axis)
        ctx.bind(out_t, out)
        return
    if idx_c is None:
        raise ctx.fail("Gather needs constant indices or a constant table")
    x = ctx.value(data_t)
    axis %= x.rank
    idx = _wrap(idx_c.values, x.shape[axis])
    if idx.ndim == 1:
        perm = x.perm
    elif idx.ndim == 0:
        perm = tuple(p - (p > axis) for p in x.perm if p != axis)
    else:
        x, perm = ctx.to_layout(x, identity(x.rank)), identity(len(shape))
    out = ctx.like(x, out_t.name, shape=shape, perm=perm)
    ctx.op("GATHER", [x, ctx.constant(ctx.name("indices"), idx.astype(np.int32))], [out], "GatherOptions",
           axis=invert(x.perm)[axis])
    ctx.bind(out_t, out)


def _wrap(indices: np.ndarray, dim: int) -> np.ndarray:
    idx = np.asarray(indices).astype(np.int64)
    return np.where(idx < 0, idx + dim, idx).astype(np.int32)


def lower_pad(ctx: Lowering, node: gs.Node) -> None:
    x = ctx.value(node.inputs[0])
    pads = ctx.const_ints(node.inputs[1])
    axes = ctx.const_ints(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3].name else list(range(x.rank))
    n = len(axes)
    before, after = [0] * x.rank, [0] * x.rank
    for i, a in enumerate(axes):
        before[a % x.rank], after[a % x.rank] = pads[i], pads[i + n]
    if min(before + after) < 0:
        raise ctx.fail("negative pads (cropping) are not supported")
    mode = node.attrs.get("mode", "constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    value = 0.0
    if len(node.inputs) > 2 and node.inputs[2].name:
        value = float(np.asarray(ctx.const(node.inputs[2]).values).reshape(-1)[0])
    paddings = ctx.constant(ctx.name("paddings"), np.asarray([[before[p], after[p]] for p in x.perm], np.int32))
    out_t = node.outputs[0]
    if mode == "constant" and value != 0.0:
        x = ctx.float_value(x)
    out = ctx.like(x, out_t.name, shape=ctx.shape(out_t))
    if mode == "constant" and value == 0.0:
        ctx.op("PAD", [x, paddings], [out], "PadOptions")  # int8 pads with the zero point: exact zeros
    elif mode == "constant":
        ctx.op("PADV2", [x, paddings, ctx.constant(ctx.name("value"), np.float32(value))], [out], "PadV2Options")
    elif mode == "reflect":
        ctx.op("MIRROR_PAD", [x, paddings], [out], "MirrorPadOptions", mode=0)
    else:
        raise ctx.fail(f"Pad mode '{mode}' is not supported")
    ctx.bind(out_t, out)


def lower_expand(ctx: Lowering, node: gs.Node) -> None:
    out_t = node.outputs[0]
    shape = ctx.shape(out_t)
    perm = ctx.common_perm([node.inputs[0]], len(shape))
    x = ctx.operand(node.inputs[0], len(shape), perm, quantized=True)
    out = ctx.like(x, out_t.name, shape=shape, perm=perm)
    ctx.op("BROADCAST_TO", [x, ctx.int32(ctx.name("shape"), out.stored_shape)], [out])
    ctx.bind(out_t, out)


HANDLERS = {
    "Reshape": lower_reshape, "Squeeze": lower_squeeze_like, "Unsqueeze": lower_squeeze_like,
    "Flatten": lower_squeeze_like, "Transpose": lower_transpose, "Einsum": lower_einsum,
    "Identity": lower_identity, "Concat": lower_concat, "Split": lower_split, "Slice": lower_slice,
    "Gather": lower_gather, "Pad": lower_pad, "Expand": lower_expand,
}
