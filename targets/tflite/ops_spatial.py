"""Resize and pooling: NHWC ops, so their input is brought to NHWC (free after a convolution)."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from qcompile.targets.tflite.layout import NHWC
from qcompile.targets.tflite.lower import Lowering
from qcompile.targets.tflite.ops_nn import conv_padding, padding_code


def _text(value, default: str) -> str:
    if value is None:
        return default
    return value.decode() if isinstance(value, bytes) else str(value)


def lower_resize(ctx: Lowering, node: gs.Node) -> None:
    """Nearest (asymmetric + floor, or half-pixel + round_prefer_ceil) and linear resize of H and W.

    Those are the ONNX settings whose sampling positions TFLite's RESIZE_NEAREST_NEIGHBOR and
    RESIZE_BILINEAR compute exactly; other settings would silently shift pixels, so they stop.
    """
    x = ctx.value(node.inputs[0])
    out_t = node.outputs[0]
    shape = ctx.shape(out_t)
    if x.rank != 4 or shape[:2] != x.shape[:2]:
        raise ctx.fail("only 4-D resizes of the spatial axes are supported")
    mode = _text(node.attrs.get("mode"), "nearest")
    transform = _text(node.attrs.get("coordinate_transformation_mode"), "half_pixel")
    nearest_mode = _text(node.attrs.get("nearest_mode"), "round_prefer_floor")
    if int(node.attrs.get("antialias", 0)) and any(o < i for o, i in zip(shape[2:], x.shape[2:], strict=True)):
        raise ctx.fail("antialiased downsampling is not supported")
    if transform == "pytorch_half_pixel" and all(d > 1 for d in shape[2:]):
        transform = "half_pixel"
    if mode == "nearest":
        if (transform, nearest_mode) == ("asymmetric", "floor"):
            align, half = False, False
        elif (transform, nearest_mode) == ("half_pixel", "round_prefer_ceil"):
            align, half = False, True
        elif transform == "asymmetric" and all(o % i == 0 for o, i in zip(shape[2:], x.shape[2:], strict=True)):
            align, half = False, False  # integer upsampling: every rounding mode picks the same pixel
        else:
            raise ctx.fail(f"nearest resize with {transform}/{nearest_mode} is not supported")
        code, options = "RESIZE_NEAREST_NEIGHBOR", "ResizeNearestNeighborOptions"
    elif mode == "linear":
        if transform not in ("half_pixel", "align_corners", "asymmetric"):
            raise ctx.fail(f"linear resize with {transform} is not supported")
        align, half = transform == "align_corners", transform == "half_pixel"
        code, options = "RESIZE_BILINEAR", "ResizeBilinearOptions"
    else:
        raise ctx.fail(f"resize mode '{mode}' is not supported")
    x = ctx.to_layout(x if code == "RESIZE_NEAREST_NEIGHBOR" else ctx.float_value(x), NHWC)
    out = ctx.like(x, out_t.name, shape=shape)
    ctx.op(code, [x, ctx.int32(ctx.name("size"), shape[2:])], [out], options, alignCorners=align,
           halfPixelCenters=half)
    ctx.bind(out_t, out)


def lower_pool(ctx: Lowering, node: gs.Node) -> None:
    x = ctx.value(node.inputs[0])
    out_t = node.outputs[0]
    shape = ctx.shape(out_t)
    if x.rank != 4:
        raise ctx.fail("only 2-D pooling is supported")
    kernel = [int(k) for k in node.attrs["kernel_shape"]]
    strides = [int(s) for s in node.attrs.get("strides", [1, 1])]
    if int(node.attrs.get("ceil_mode", 0)) or any(int(d) != 1 for d in node.attrs.get("dilations", [1, 1])):
        raise ctx.fail("pooling with ceil_mode or dilations is not supported")
    padding, pads = conv_padding(ctx, node, x.shape[2:], kernel, strides, [1, 1], shape[2:])
    # TFLite's SAME pooling leaves padding out of the max and of the average's count.
    include_pad = node.op == "AveragePool" and int(node.attrs.get("count_include_pad", 0))
    if pads is not None or padding == "SAME" and include_pad:
        raise ctx.fail("pooling with these pads is not supported")
    code = "MAX_POOL_2D" if node.op == "MaxPool" else "AVERAGE_POOL_2D"
    x = ctx.to_layout(x, NHWC)
    out = ctx.like(x, out_t.name, shape=shape)
    ctx.op(code, [x], [out], "Pool2DOptions", padding=padding_code(padding), strideW=strides[1],
           strideH=strides[0], filterWidth=kernel[1], filterHeight=kernel[0])
    ctx.bind(out_t, out)


HANDLERS = {"Resize": lower_resize, "MaxPool": lower_pool, "AveragePool": lower_pool}
