"""Layout bookkeeping of the TFLite lowering: which ONNX transposes and reshapes cost nothing."""

from qcompile.targets.tflite.layout import (
    NHWC,
    after_reshape,
    after_transpose,
    channels_last,
    identity,
    moves_only_unit_dims,
    relayout,
    stored_shape,
)


def test_nhwc_storage_of_nchw():
    assert channels_last(4) == NHWC
    assert stored_shape((2, 32, 16, 8), NHWC) == (2, 16, 8, 32)
    assert relayout(identity(4), NHWC) == (0, 2, 3, 1)
    assert relayout(NHWC, identity(4)) == (0, 3, 1, 2)


def test_onnx_transpose_to_nhwc_of_nhwc_storage_is_identity():
    # Transpose(x, [0, 2, 3, 1]) of an NHWC-stored NCHW tensor: the stored bytes already are the result.
    assert after_transpose(NHWC, (0, 2, 3, 1)) == identity(4)
    assert after_transpose(identity(3), (0, 2, 1)) == (0, 2, 1)


def test_attention_entry_reshape_keeps_nhwc_bytes():
    # conv output [N, C, H, W] stored NHWC -> Reshape [N, C, H*W]: stored as [N, H*W, C] (perm (0, 2, 1)).
    perm = after_reshape((2, 32, 16, 16), NHWC, (2, 32, 256))
    assert perm == (0, 2, 1) and stored_shape((2, 32, 256), perm) == (2, 256, 32)
    # ... and the way back: [N, C, H*W] stored [N, H*W, C] -> [N, C, H, W] is NHWC again.
    assert after_reshape((2, 32, 256), (0, 2, 1), (2, 32, 16, 16)) == NHWC


def test_reshape_that_splits_a_non_contiguous_group_needs_row_major():
    # GroupNorm's [N, C, H, W] -> [N, G, C/G*H*W] mixes C with H, W: not possible on NHWC storage.
    assert after_reshape((2, 32, 16, 16), NHWC, (2, 8, 1024)) is None
    assert after_reshape((2, 32, 16, 16), identity(4), (2, 8, 1024)) == identity(3)


def test_unit_axes_move_freely():
    assert moves_only_unit_dims((2, 1, 1, 32), (0, 3, 1, 2))
    assert not moves_only_unit_dims((2, 4, 1, 32), (0, 3, 1, 2))
    assert after_reshape((2, 32), identity(2), (2, 32, 1, 1)) == identity(4)
    assert after_reshape((2, 1, 32), identity(3), (2, 32)) == identity(2)
