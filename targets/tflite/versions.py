"""Operator versions, from the TFLite op-versioning rules for the ops this target emits.

The interpreter accepts any version its kernels register, but delegates and older runtimes read the
version to decide whether they can run an op, so a file should claim the version its features need
(int8 kernels, per-channel weights, keep_num_dims, rank above 4, ...), no more and no less.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from qcompile.targets.tflite.builder import TensorSpec

INT8 = np.dtype(np.int8)
FLOAT = np.dtype(np.float32)

# Ops whose version is 2 for int8 inputs and 1 otherwise (the common case in the versioning rules).
_INT8_IS_V2 = frozenset({
    "ADD", "MUL", "CONCATENATION", "SOFTMAX", "MEAN", "LOGISTIC", "TANH", "GELU", "GATHER", "SPLIT_V",
    "BATCH_MATMUL", "MAX_POOL_2D", "AVERAGE_POOL_2D", "RESIZE_NEAREST_NEIGHBOR", "DEPTH_TO_SPACE", "SUM",
    "MAXIMUM", "MINIMUM", "RSQRT",
})


def op_version(code: str, inputs: Sequence[TensorSpec | None], outputs: Sequence[TensorSpec],
               options: Mapping[str, Any]) -> int:
    first = inputs[0] if inputs and inputs[0] is not None else None
    in_type = first.dtype if first is not None else None
    rank = len(first.shape) if first is not None else 0
    if code == "CONV_2D":
        return 3 if in_type == INT8 else 1
    if code == "DEPTHWISE_CONV_2D":
        if in_type == INT8:
            return 3
        return 2 if options.get("dilationWFactor", 1) != 1 or options.get("dilationHFactor", 1) != 1 else 1
    if code == "FULLY_CONNECTED":
        if len(inputs) == 2 or (len(inputs) == 3 and inputs[2] is None):
            return 6
        if options.get("keepNumDims"):
            return 5
        return 4 if in_type == INT8 else 1
    if code == "TRANSPOSE":
        return 6 if rank > 5 else 4 if rank > 4 else 2 if in_type == INT8 else 1
    if code == "STRIDED_SLICE":
        return 4 if rank > 4 else 2 if in_type == INT8 else 1
    if code == "SLICE":  # 4 is int16, 5 is rank 5
        return 5 if rank > 4 else 2 if in_type == INT8 else 1
    if code in ("PAD", "PADV2"):
        return 4 if rank > 4 else 2 if in_type == INT8 else 1
    if code == "SUB":
        big = len(inputs) > 1 and max(len(t.shape) for t in inputs if t is not None) > 4
        return 3 if big else 2 if in_type == INT8 else 1
    if code == "DIV":
        return 2 if len(inputs) > 1 and max(len(t.shape) for t in inputs if t is not None) > 4 else 1
    if code == "SPLIT":
        data = inputs[1]
        return 2 if data is not None and data.dtype == INT8 else 1
    if code == "DEQUANTIZE":
        if in_type == INT8:
            return 5 if first is not None and first.quant is not None and first.quant.per_channel else 2
        return 1
    if code == "QUANTIZE":
        return 1
    if code == "BROADCAST_TO":
        return 3 if in_type == INT8 else 2
    if code == "CAST":
        types = {in_type, outputs[0].dtype}
        return 3 if INT8 in types else 1
    if code in _INT8_IS_V2:
        return 2 if in_type == INT8 else 1
    return 1
