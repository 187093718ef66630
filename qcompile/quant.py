"""Quantization arithmetic: dtypes, ranges, scales and zero points. No graph code here."""

from __future__ import annotations

import enum
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx


class QuantDType(enum.Enum):
    INT8 = "int8"
    UINT8 = "uint8"
    INT16 = "int16"
    UINT16 = "uint16"
    INT32 = "int32"
    # FP8 E4M3 without infinities (ONNX FLOAT8E4M3FN, opset 19+): TensorRT's FP8; largest value 448.
    FLOAT8E4M3FN = "float8e4m3fn"

    @property
    def is_float(self) -> bool:
        """A floating-point quantized type: values are rounded to its grid, not to integers."""
        return self is QuantDType.FLOAT8E4M3FN

    @property
    def numpy(self) -> np.dtype:
        return np.dtype(ml_dtypes.float8_e4m3fn) if self.is_float else np.dtype(self.value)

    @property
    def onnx(self) -> int:
        if self.is_float:
            return onnx.TensorProto.FLOAT8E4M3FN
        return onnx.helper.np_dtype_to_tensor_dtype(self.numpy)

    @property
    def qmin(self) -> int:
        if self.is_float:
            return -int(ml_dtypes.finfo(self.numpy).max)
        return int(np.iinfo(self.numpy).min)

    @property
    def qmax(self) -> int:
        if self.is_float:
            return int(ml_dtypes.finfo(self.numpy).max)
        return int(np.iinfo(self.numpy).max)

    @property
    def bits(self) -> int:
        return self.numpy.itemsize * 8


@dataclass(frozen=True)
class TensorRange:
    """The float range an activation is clipped to (from an estimator over calibration statistics)."""

    lo: float
    hi: float


@dataclass(frozen=True, eq=False)
class QParams:
    """Scale and zero point; per-tensor when `axis` is None, else one per index along `axis`."""

    scale: np.ndarray  # float32, shape () or (C,)
    zero_point: np.ndarray  # dtype's numpy type, same shape as scale
    dtype: QuantDType
    axis: int | None = None


# Smallest usable scale: a constant-zero tensor still needs a valid (positive) scale.
MIN_SCALE = 1e-8


def activation_qparams(rng: TensorRange, dtype: QuantDType, *, symmetric: bool) -> QParams:
    """Per-tensor parameters covering `rng`; asymmetric ranges always include 0 (exact zero padding)."""
    lo, hi = min(float(rng.lo), 0.0), max(float(rng.hi), 0.0)
    if symmetric:
        amax = max(abs(lo), abs(hi))
        scale = max(amax / dtype.qmax, MIN_SCALE)
        zero = 0 if dtype.qmin < 0 else (dtype.qmax + 1) // 2
    else:
        scale = max((hi - lo) / (dtype.qmax - dtype.qmin), MIN_SCALE)
        zero = int(np.clip(round(dtype.qmin - lo / scale), dtype.qmin, dtype.qmax))
    return QParams(np.array(scale, np.float32), np.array(zero, dtype.numpy), dtype)


def power_of_two_scale(qp: QParams) -> QParams:
    """The per-tensor parameters with the scale rounded up to a power of two, the range's low end kept
    on the grid: a kernel that requantizes exactly only by shifts gets one, at the cost of at most a bit."""
    scale = float(qp.scale)
    wide = 2.0 ** np.ceil(np.log2(scale))
    zero = int(np.clip(round(qp.dtype.qmin - (qp.dtype.qmin - int(qp.zero_point)) * scale / wide),
                       qp.dtype.qmin, qp.dtype.qmax))
    return QParams(np.array(wide, np.float32), np.array(zero, qp.dtype.numpy), qp.dtype)


def grid_ratio(narrow: QuantDType, wide: QuantDType) -> int:
    """Wide steps per narrow step: 257 from uint8 to uint16 (65535 / 255), so the grids coincide."""
    return (wide.qmax - wide.qmin) // (narrow.qmax - narrow.qmin)


def widen_qparams(scale: np.ndarray, zero: np.ndarray, narrow: QuantDType, wide: QuantDType) -> QParams:
    """The same float grid in the wide dtype: each narrow step split into `grid_ratio` wide ones, so a
    narrow value converts to the wide type exactly (q_wide = ratio * q_narrow + offset)."""
    ratio = grid_ratio(narrow, wide)
    wide_zero = (np.asarray(zero, np.int64) - narrow.qmin) * ratio + wide.qmin
    return QParams(np.asarray(np.asarray(scale, np.float64) / ratio, np.float32),
                   np.asarray(wide_zero, wide.numpy), wide)


def widen_full_range(scale: np.ndarray, zero: np.ndarray, narrow: QuantDType, wide: QuantDType) -> QParams:
    """A fixed output encoding (HTP's Sigmoid: [0, 1) over every code of the width) in the wide dtype: the
    same range over every wide code (1/65536 at 16 bits from 1/256), not the narrow grid split 257 ways."""
    levels = (wide.qmax - wide.qmin + 1) // (narrow.qmax - narrow.qmin + 1)
    return QParams(np.asarray(np.asarray(scale, np.float64) / levels, np.float32),
                   np.asarray((np.asarray(zero, np.int64) - narrow.qmin) * levels + wide.qmin, wide.numpy), wide)


def weight_qparams(weight: np.ndarray, axis: int, dtype: QuantDType) -> QParams:
    """Symmetric per-channel parameters (zero point 0, the restricted range [-qmax, qmax])."""
    moved = np.moveaxis(np.asarray(weight, np.float32), axis, 0).reshape(weight.shape[axis], -1)
    amax = np.abs(moved).max(axis=1)
    scale = np.maximum(amax / dtype.qmax, MIN_SCALE).astype(np.float32)
    return QParams(scale, np.zeros_like(scale, dtype=dtype.numpy), dtype, axis)


def _broadcast(values: np.ndarray, qp: QParams, ndim: int) -> np.ndarray:
    if qp.axis is None:
        return values
    shape = [1] * ndim
    shape[qp.axis] = -1
    return values.reshape(shape)


def quantize(x: np.ndarray, qp: QParams, *, symmetric_range: bool = False) -> np.ndarray:
    """Round half to even, as ONNX QuantizeLinear does; `symmetric_range` clips to [-qmax, qmax].
    FP8 as onnxruntime's QuantizeLinear computes it: x / scale in float32, saturated to +-448, then
    rounded to the nearest E4M3 value (ties to even)."""
    scale = _broadcast(qp.scale, qp, x.ndim)
    if qp.dtype.is_float:
        scaled = np.asarray(x, np.float32) / np.asarray(scale, np.float32)
        return np.asarray(np.clip(scaled, qp.dtype.qmin, qp.dtype.qmax).astype(qp.dtype.numpy))
    zero = _broadcast(qp.zero_point.astype(np.int64), qp, x.ndim)
    q = np.rint(np.asarray(x, np.float64) / scale) + zero
    qmin = -qp.dtype.qmax if symmetric_range else qp.dtype.qmin
    return np.asarray(np.clip(q, qmin, qp.dtype.qmax).astype(qp.dtype.numpy))  # 0-d stays an array


def dequantize(q: np.ndarray, qp: QParams) -> np.ndarray:
    scale = _broadcast(qp.scale, qp, q.ndim)
    if qp.dtype.is_float:  # symmetric: the zero point is 0
        return (np.asarray(q).astype(np.float32) * np.asarray(scale, np.float32)).astype(np.float32)
    zero = _broadcast(qp.zero_point.astype(np.int64), qp, q.ndim)
    return ((q.astype(np.int64) - zero) * scale).astype(np.float32)
