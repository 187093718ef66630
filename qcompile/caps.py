"""Target capabilities as data: what a target can run quantized and how. Q/DQ insertion reads these."""

from __future__ import annotations

from dataclasses import dataclass

from qcompile.quant import QuantDType

WEIGHTED_OPS = frozenset({"Conv", "MatMul", "Gemm"})


@dataclass(frozen=True)
class TargetCaps:
    weight_dtype: QuantDType  # always symmetric per output channel
    activation_dtype: QuantDType
    activation_symmetric: bool
    # Ops whose activation inputs and constant weights get Q/DQ.
    weighted_ops: frozenset[str] = WEIGHTED_OPS
    # Ops whose outputs also get Q/DQ, so the runtime can fuse DQ -> op -> Q into one integer kernel.
    quantize_outputs_of: frozenset[str] = frozenset()
    # Biases of quantized Conv/Gemm as int32 with scale s_in * s_w (what integer kernels consume).
    quantize_bias: bool = True
    # Quantize MatMuls whose two inputs are both activations (attention batched matmuls).
    activation_matmul: bool = False
