"""Axis permutations between an ONNX tensor and the TFLite tensor that stores it.

A lowered value is stored as `transpose(onnx_tensor, perm)`: TFLite axis i holds ONNX axis perm[i]
(NHWC storage of an NCHW tensor is perm (0, 2, 3, 1)). Transposes in the ONNX graph then cost
nothing: they only change the perm. A physical TRANSPOSE is emitted only where an op needs one
specific layout (CONV_2D wants NHWC, RESHAPE a row-major order), and a Reshape whose merged or split
dimensions stay contiguous in the stored order keeps the layout it was given (this is what removes
the NCHW <-> NHWC transposes around attention blocks).
"""

from __future__ import annotations

from collections.abc import Sequence

Perm = tuple[int, ...]

NHWC = (0, 2, 3, 1)


def identity(rank: int) -> Perm:
    return tuple(range(rank))


def channels_last(rank: int) -> Perm:
    """(0, 2, ..., rank-1, 1): NHWC for rank 4, NWC for rank 3, NDHWC for rank 5."""
    return (0, *range(2, rank), 1) if rank >= 3 else identity(rank)


def invert(perm: Sequence[int]) -> Perm:
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return tuple(inv)


def stored_shape(shape: Sequence[int], perm: Sequence[int]) -> tuple[int, ...]:
    return tuple(int(shape[p]) for p in perm)


def after_transpose(perm: Sequence[int], onnx_perm: Sequence[int]) -> Perm:
    """Stored perm of `Transpose(x, onnx_perm)` when x is stored with `perm` and the data is not moved.

    Output axis j is input axis onnx_perm[j]; stored axis i holds input axis perm[i], i.e. output axis
    inverse(onnx_perm)[perm[i]].
    """
    inv = invert(onnx_perm)
    return tuple(inv[p] for p in perm)


def relayout(current: Sequence[int], wanted: Sequence[int]) -> Perm:
    """The TFLite TRANSPOSE permutation turning storage `current` into storage `wanted`."""
    pos = invert(current)
    return tuple(pos[w] for w in wanted)


def moves_only_unit_dims(stored: Sequence[int], tperm: Sequence[int]) -> bool:
    """True when transposing a tensor of shape `stored` by `tperm` keeps its bytes in place (a RESHAPE)."""
    big = [a for a in tperm if stored[a] != 1]
    return big == sorted(big)


def _groups(in_shape: Sequence[int], out_shape: Sequence[int]) -> list[tuple[list[int], list[int]]] | None:
    """Pair the non-unit axes of a reshape into groups of equal element count (row-major merge/split)."""
    ins = [a for a, d in enumerate(in_shape) if d != 1]
    outs = [a for a, d in enumerate(out_shape) if d != 1]
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(ins) or j < len(outs):
        if i >= len(ins) or j >= len(outs):
            return None
        gi, gj = [ins[i]], [outs[j]]
        pi, pj = in_shape[ins[i]], out_shape[outs[j]]
        i, j = i + 1, j + 1
        while pi != pj:
            if pi < pj:
                if i >= len(ins):
                    return None
                gi.append(ins[i])
                pi *= in_shape[ins[i]]
                i += 1
            else:
                if j >= len(outs):
                    return None
                gj.append(outs[j])
                pj *= out_shape[outs[j]]
                j += 1
        groups.append((gi, gj))
    return groups


def after_reshape(in_shape: Sequence[int], perm: Sequence[int], out_shape: Sequence[int]) -> Perm | None:
    """Stored perm of `Reshape(x, out_shape)` computed by a plain RESHAPE of x's stored tensor, or None.

    Possible when every group of merged/split ONNX axes appears in the stored order contiguously and
    in increasing order: the stored tensor is then a permutation of whole groups.
    """
    groups = _groups(in_shape, out_shape)
    if groups is None:
        return None
    stored_big = [a for a in perm if in_shape[a] != 1]
    position = {a: k for k, a in enumerate(stored_big)}
    order = []
    for gi, gj in groups:
        ks = [position[a] for a in gi]
        if ks != list(range(ks[0], ks[0] + len(ks))):
            return None
        order.append((ks[0], gj))
    placed: list[int] = [a for _, gj in sorted(order) for a in gj]
    for a in range(len(out_shape)):
        if out_shape[a] == 1:
            at = placed.index(a - 1) + 1 if a - 1 in placed else 0
            placed.insert(at, a)
    return tuple(placed)
