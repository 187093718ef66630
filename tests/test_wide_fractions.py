"""The cost figure every manifest records (`bucket_precision.wide_fractions`): a layer whose input is
stored at the target's own activation type is narrow, float8 included."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_graphsurgeon as gs
import pytest

from qcompile.bucket_precision import wide_fractions
from qcompile.config import TargetName
from qcompile.target import load_target


def _conv_graph(zero: np.ndarray | None) -> gs.Graph:
    """x -> [Q -> DQ at `zero`'s type] -> Conv with a constant weight (no Q/DQ when `zero` is None)."""
    x = gs.Variable("x", np.float32, (1, 4, 8, 8))
    nodes, feed = [], x
    if zero is not None:
        q, dq = gs.Variable("xq", zero.dtype, (1, 4, 8, 8)), gs.Variable("xdq", np.float32, (1, 4, 8, 8))
        scale = gs.Constant("s", np.array(0.1, np.float32))
        z = gs.Constant("z", zero)
        nodes += [gs.Node("QuantizeLinear", inputs=[x, scale, z], outputs=[q]),
                  gs.Node("DequantizeLinear", inputs=[q, scale, z], outputs=[dq])]
        feed = dq
    y = gs.Variable("y", np.float32, (1, 8, 8, 8))
    nodes.append(gs.Node("Conv", inputs=[feed, gs.Constant("w", np.ones((8, 4, 3, 3), np.float32))], outputs=[y],
                         attrs={"pads": [1, 1, 1, 1]}))
    return gs.Graph(nodes=nodes, inputs=[x], outputs=[y], opset=20)


@pytest.mark.parametrize(("target", "zero"), [("trt-fp8", np.zeros((), ml_dtypes.float8_e4m3fn)),
                                              ("trt-int8", np.zeros((), np.int8)),
                                              ("ort-int8", np.zeros((), np.uint8))])
def test_a_layer_at_the_targets_own_type_is_narrow_and_a_float_one_wide(target, zero):
    caps = load_target(TargetName.parse(target)).caps
    if zero.dtype != caps.activation_dtype.numpy:
        zero = zero.astype(caps.activation_dtype.numpy)
    narrow = wide_fractions(_conv_graph(zero), caps)
    assert narrow["wide_mac_fraction"] == 0.0 and narrow["wide_activation_bytes_fraction"] == 0.0
    wide = wide_fractions(_conv_graph(None), caps)
    assert wide["wide_mac_fraction"] == 1.0 and wide["wide_activation_bytes_fraction"] == 1.0
