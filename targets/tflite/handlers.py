"""The table of op handlers: ONNX op type -> function lowering one node. Listed explicitly, no registration
by import side effect, so what the target supports is readable in one place."""

from __future__ import annotations

from qcompile.targets.tflite import ops_elementwise, ops_nn, ops_norm, ops_quant, ops_shape, ops_spatial

HANDLERS = {
    **ops_quant.HANDLERS,
    **ops_nn.HANDLERS,
    **ops_elementwise.HANDLERS,
    **ops_shape.HANDLERS,
    **ops_spatial.HANDLERS,
    **ops_norm.HANDLERS,
    # Reshape first checks whether it starts a GroupNorm unit that fuse_groupnorm annotated.
    "Reshape": ops_norm.lower_reshape_or_group_norm,
}
SUPPORTED_OPS = frozenset(HANDLERS)
