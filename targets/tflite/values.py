"""What the lowering knows about each ONNX tensor: a stored TFLite tensor, or a constant."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qcompile.quant import QParams
from qcompile.targets.tflite.builder import Quant
from qcompile.targets.tflite.layout import Perm, stored_shape


@dataclass(frozen=True)
class Value:
    """An ONNX tensor as stored in TFLite.

    The stored tensor is `transpose(onnx_tensor, perm)`. With `quant` set, the stored tensor is int8
    and the ONNX (float) tensor is its dequantization: a DequantizeLinear costs nothing, it only
    exposes the int8 tensor its QuantizeLinear made.
    """

    tensor: int
    shape: tuple[int, ...]  # ONNX shape
    perm: Perm
    dtype: np.dtype  # stored dtype
    quant: Quant | None = None

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def stored_shape(self) -> tuple[int, ...]:
        return stored_shape(self.shape, self.perm)

    @property
    def is_identity(self) -> bool:
        return self.perm == tuple(range(self.rank))


@dataclass(frozen=True, eq=False)
class ConstValue:
    """A constant input: its float value and, for the output of a DequantizeLinear, its integer storage."""

    values: np.ndarray  # the ONNX value (dequantized when `raw` is set)
    raw: np.ndarray | None = None
    qparams: QParams | None = None

    @property
    def quantized(self) -> bool:
        return self.raw is not None
