"""Normalizations and reductions: MEAN / SUB / MUL / RSQRT sequences in float, in the stored layout.

TFLite has no layer/instance/group norm builtin, so each becomes mean, centred square mean, rsqrt
and the affine, reduced over whichever stored axes hold the ONNX normalized axes: no transposes.
GroupNorm as exporters write it (Reshape [N,C,...] -> [N,G,-1], InstanceNormalization, Reshape back,
Mul gamma, Add beta) is lowered whole where `fuse_groupnorm` annotated it as a unit (the TFLite
pipelines run that pass), so an NHWC activation is normalized as [N, H*W, G, C/G] without leaving NHWC.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_graphsurgeon as gs

from qcompile.passes.fuse_groupnorm import KIND as GROUPNORM
from qcompile.rewrite import per_channel
from qcompile.targets.tflite.builder import Quant
from qcompile.targets.tflite.layout import channels_last, identity, invert, stored_shape
from qcompile.targets.tflite.lower import Lowering
from qcompile.targets.tflite.ops_shape import lower_reshape
from qcompile.targets.tflite.values import Value

SOFTMAX_INT8_OUT = Quant.per_tensor(1 / 256, -128)
REDUCERS = {"ReduceMean": "MEAN", "ReduceSum": "SUM", "ReduceMax": "REDUCE_MAX", "ReduceMin": "REDUCE_MIN"}


def _reduce(ctx: Lowering, code: str, x: Value, stored_axes: Sequence[int], name: str,
            quant: Quant | None | bool = True) -> Value:
    """Reduce over stored axes, keeping them as unit axes (so the result broadcasts back against x)."""
    shape = list(x.shape)
    for a in stored_axes:
        shape[x.perm[a]] = 1
    out = ctx.like(x, name, shape=shape, quant=quant)
    ctx.op(code, [x, ctx.int32(name + "/axes", sorted(stored_axes))], [out], "ReducerOptions", keepDims=True)
    return out


def _binary(ctx: Lowering, code: str, a: Value, b: Value | int, name: str) -> Value:
    out = ctx.like(a, name)
    ctx.op(code, [a, b], [out], {"ADD": "AddOptions", "SUB": "SubOptions", "MUL": "MulOptions"}[code])
    return out


def normalize(ctx: Lowering, x: Value, stored_axes: Sequence[int], eps: float, name: str,
              scale: np.ndarray | None = None) -> Value:
    """(x - mean) * rsqrt(var + eps) over `stored_axes`, in float, times `scale` when given.

    `scale` (a constant in the stored layout, unit along the axes the statistics keep) is multiplied
    into the small inverse-std tensor before it meets x: one full-size pass fewer per norm. GroupNorm's
    gamma varies per channel inside a group, yet inv_std * gamma is only [N, 1, G, C/G].
    """
    mean = _reduce(ctx, "MEAN", x, stored_axes, name + "/mean")
    centred = _binary(ctx, "SUB", x, mean, name + "/centred")
    square = _binary(ctx, "MUL", centred, centred, name + "/square")
    var = _reduce(ctx, "MEAN", square, stored_axes, name + "/var")
    eps_t = ctx.constant(name + "/eps", np.full((1,) * x.rank, eps, np.float32))
    shifted = _binary(ctx, "ADD", var, eps_t, name + "/var_eps")
    inv_std = ctx.like(shifted, name + "/inv_std")
    ctx.op("RSQRT", [shifted], [inv_std])
    if scale is not None:
        stored = tuple(np.broadcast_shapes(inv_std.stored_shape, scale.shape))
        scaled = ctx.like(inv_std, name + "/inv_std_scaled", shape=stored_shape(stored, invert(inv_std.perm)))
        ctx.op("MUL", [inv_std, ctx.constant(name + "/gamma", scale.astype(np.float32))], [scaled], "MulOptions")
        inv_std = scaled
    return _binary(ctx, "MUL", centred, inv_std, name + "/normalized")


def affine(ctx: Lowering, y: Value, scale: np.ndarray | None, bias: np.ndarray | None, name: str) -> Value:
    """y * scale + bias with ONNX-shaped (broadcastable) constants; identity parts are skipped."""
    if scale is not None and not np.all(scale == 1.0):
        y = _binary(ctx, "MUL", y, ctx.const_operand(name + "/scale", scale.astype(np.float32), y.rank, y.perm),
                    name + "/scaled")
    if bias is not None and np.any(bias != 0.0):
        y = _binary(ctx, "ADD", y, ctx.const_operand(name + "/bias", bias.astype(np.float32), y.rank, y.perm),
                    name + "/shifted")
    return y


def _const_or_none(ctx: Lowering, node: gs.Node, i: int) -> np.ndarray | None:
    if len(node.inputs) <= i or not node.inputs[i].name:
        return None
    c = ctx.const(node.inputs[i])
    if c is None:
        raise ctx.fail(f"input {i} ('{node.inputs[i].name}') must be a constant")
    return np.asarray(c.values, np.float32)


def _single_output(ctx: Lowering, node: gs.Node) -> None:
    if any(ctx.consumers.get(t.name) or t.name in ctx.output_names for t in node.outputs[1:]):
        raise ctx.fail("only the first output is supported")


def lower_layer_norm(ctx: Lowering, node: gs.Node) -> None:
    _single_output(ctx, node)
    x = ctx.float_value(node.inputs[0])
    axis = int(node.attrs.get("axis", -1)) % x.rank
    stored = [invert(x.perm)[a] for a in range(axis, x.rank)]
    y = normalize(ctx, x, stored, float(node.attrs.get("epsilon", 1e-5)), node.outputs[0].name)
    ctx.bind(node.outputs[0], affine(ctx, y, _const_or_none(ctx, node, 1), _const_or_none(ctx, node, 2),
                                     node.outputs[0].name))


def _channel_shaped(values: np.ndarray | None, rank: int) -> np.ndarray | None:
    return None if values is None else values.reshape((-1,) + (1,) * (rank - 2))


def lower_instance_norm(ctx: Lowering, node: gs.Node) -> None:
    x = ctx.float_value(node.inputs[0])
    stored = [invert(x.perm)[a] for a in range(2, x.rank)]
    scale, bias = _const_or_none(ctx, node, 1), _const_or_none(ctx, node, 2)
    gamma = None if scale is None or np.all(scale == 1.0) else np.transpose(_channel_shaped(scale, x.rank)[None],
                                                                             x.perm)
    y = normalize(ctx, x, stored, float(node.attrs.get("epsilon", 1e-5)), node.outputs[0].name, gamma)
    ctx.bind(node.outputs[0], affine(ctx, y, None, _channel_shaped(bias, x.rank), node.outputs[0].name))


def group_norm(ctx: Lowering, x: Value, groups: int, eps: float, scale_c: np.ndarray | None,
               bias_c: np.ndarray | None, name: str) -> Value:
    """GroupNorm of x [N, C, *S] with per-channel affine, in channels-last storage when x has it."""
    x = ctx.float_value(x)
    n, c, spatial = x.shape[0], x.shape[1], x.shape[2:]
    size = int(np.prod(spatial)) if spatial else 1
    if x.perm == channels_last(x.rank):
        grouped = ctx.reshape(x, (n, size, groups, c // groups), identity(4), name + "/grouped")
        gamma = None if scale_c is None or np.all(scale_c == 1.0) else scale_c.reshape(1, 1, groups, c // groups)
        y = normalize(ctx, grouped, [1, 3], eps, name, gamma)
        scale_c = None
    else:
        x = ctx.to_layout(x, identity(x.rank))
        grouped = ctx.reshape(x, (n, groups, (c // groups) * size), identity(3), name + "/grouped")
        y = normalize(ctx, grouped, [2], eps, name)
    y = ctx.reshape(y, x.shape, x.perm, name + "/ungrouped")
    return affine(ctx, y, _channel_shaped(scale_c, x.rank), _channel_shaped(bias_c, x.rank), name)


def lower_group_norm(ctx: Lowering, node: gs.Node) -> None:
    """ONNX GroupNormalization: per-group scale/bias in opset 18, per-channel from opset 21."""
    x = ctx.value(node.inputs[0])
    groups = int(node.attrs["num_groups"])
    scale, bias = _const_or_none(ctx, node, 1), _const_or_none(ctx, node, 2)
    c = x.shape[1]
    if scale is not None and scale.size == groups and groups != c:
        scale = np.repeat(scale, c // groups)
    if bias is not None and bias.size == groups and groups != c:
        bias = np.repeat(bias, c // groups)
    ctx.bind(node.outputs[0], group_norm(ctx, x, groups, float(node.attrs.get("epsilon", 1e-5)), scale, bias,
                                         node.outputs[0].name))


def lower_group_norm_unit(ctx: Lowering, members: dict[str, list[gs.Node]]) -> None:
    """A GroupNorm unit as `fuse_groupnorm` annotates the exporter's nodes (Reshape [N,G,-1] ->
    InstanceNormalization(1, 0) -> Reshape back [-> Mul gamma] [-> Add beta]), lowered whole, with the
    per-channel gamma multiplied into the per-group inverse std (diffusers exports write the affine
    after the reshape back)."""
    reshape_in, norm = members["reshape_in"][0], members["instance_norm"][0]
    src = ctx.value(reshape_in.inputs[0])
    c, rank = src.shape[1], src.rank
    groups = int(ctx.const_ints(reshape_in.inputs[1])[1])
    scale, bias = (_channel_values(members.get(role), c, rank) for role in ("gamma", "beta"))
    last = members.get("beta") or members.get("gamma") or members["reshape_out"]
    ctx.skip.update(n.name for nodes in members.values() for n in nodes)
    out_tensor = last[0].outputs[0]
    ctx.bind(out_tensor, group_norm(ctx, src, groups, float(norm.attrs.get("epsilon", 1e-5)), scale, bias,
                                    out_tensor.name))


def _channel_values(nodes: list[gs.Node] | None, channels: int, rank: int) -> np.ndarray | None:
    """The per-channel constant of the unit's gamma Mul or beta Add, as [C]; None when there is none."""
    if not nodes:
        return None
    return next(v for v in (per_channel(t, channels, rank) for t in nodes[0].inputs) if v is not None)


def lower_softmax(ctx: Lowering, node: gs.Node) -> None:
    x = ctx.value(node.inputs[0])
    axis = int(node.attrs.get("axis", -1)) % x.rank
    if x.perm[-1] != axis:
        x = ctx.to_layout(x, tuple(p for p in x.perm if p != axis) + (axis,))
    out_q = ctx.out_quant(node)
    if x.quant is None or out_q != SOFTMAX_INT8_OUT:
        x, out_q = ctx.float_value(x), None
    out = ctx.like(x, node.outputs[0].name, quant=out_q)
    ctx.op("SOFTMAX", [x], [out], "SoftmaxOptions", beta=1.0)
    ctx.bind(node.outputs[0], out)


def lower_reduce(ctx: Lowering, node: gs.Node) -> None:
    x = ctx.value(node.inputs[0])
    if len(node.inputs) > 1 and node.inputs[1].name:
        axes = ctx.const_ints(node.inputs[1])
    else:
        axes = [int(a) for a in node.attrs.get("axes", [])]
    if not axes:
        if int(node.attrs.get("noop_with_empty_axes", 0)):
            ctx.bind(node.outputs[0], x)
            return
        axes = list(range(x.rank))
    axes = sorted({a % x.rank for a in axes})
    code = REDUCERS[node.op]
    out_q = ctx.out_quant(node)
    if x.quant is not None and code in ("REDUCE_MAX", "REDUCE_MIN"):
        quant = x.quant  # max and min commute with dequantization
    elif x.quant is not None and code == "MEAN" and out_q is not None:
        quant = out_q
    else:
        x, quant = ctx.float_value(x), None
    reduced = _reduce(ctx, code, x, [invert(x.perm)[a] for a in axes], node.outputs[0].name + "/keepdims", quant)
    if int(node.attrs.get("keepdims", 1)):
        ctx.bind(node.outputs[0], reduced)
        return
    shape = ctx.shape(node.outputs[0])
    perm = tuple(p - sum(a < p for a in axes) for p in reduced.perm if p not in axes)
    ctx.bind(node.outputs[0], ctx.view(reduced, shape, perm, node.outputs[0].name))


HANDLERS = {
    "LayerNormalization": lower_layer_norm, "InstanceNormalization": lower_instance_norm,
    "GroupNormalization": lower_group_norm, "Softmax": lower_softmax,
    **{op: lower_reduce for op in REDUCERS},
}


def lower_reshape_or_group_norm(ctx: Lowering, node: gs.Node) -> None:
    """A Reshape, or the first node of a GroupNorm unit that `fuse_groupnorm` annotated."""
    unit = ctx.unit(node)
    if unit is not None and unit[0].startswith(GROUPNORM + ":") and unit[1] == "reshape_in":
        lower_group_norm_unit(ctx, unit[2])
    else:
        lower_reshape(ctx, node)
