"""Target capabilities as data: what a target can run quantized and how. Q/DQ insertion reads these."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from qcompile.quant import QuantDType

WEIGHTED_OPS = frozenset({"Conv", "MatMul", "Gemm"})


class PrecisionFallback(enum.Enum):
    """What taking a layer out of the target's main precision means (mixed precision, exclusions)."""

    FLOAT = "float"  # the layer stays float: the runtime has float kernels (onnxruntime, LiteRT)
    WIDE = "wide"  # the layer's activations go to `wide_dtype`: integer-only NPUs (A16W8 on HTP)
    NONE = "none"  # nothing to fall back to: activations are already at the widest width


class QuantLevel(enum.Enum):
    """Which layers an explicit-quantization target quantizes, cumulative, as TensorRT's demo/Diffusion
    and ModelOpt's diffusers example number them (`--quant-level` 1.0 / 2.0 / 2.5 / 3.0 / 4.0)."""

    CONV = "conv"  # 1.0: convolutions only
    FFN = "ffn"  # 2.0: + the feed-forward linears (module path `ff.net`)
    QKV = "qkv"  # 2.5: + the attention projections to_q / to_k / to_v (and the joint blocks' add_*_proj)
    LINEAR = "linear"  # 3.0: + every other linear layer
    ATTENTION = "attention"  # 4.0: + the attention batched matmuls (FP8: Q, K, V and the softmax output)

    @property
    def rank(self) -> int:
        return list(QuantLevel).index(self)

    def includes(self, other: QuantLevel) -> bool:
        return self.rank >= other.rank


@dataclass(frozen=True)
class ExplicitRules:
    """Q/DQ placement for a runtime that reads precision from explicit Q/DQ and fuses around it
    (TensorRT): symmetric, per-channel weights, per-tensor activations, both operands of a quantized
    layer quantized, skip-Add residuals quantized, narrow layers left float (`passes/plan_explicit.py`)."""

    level: QuantLevel
    # Layers whose reduction (K) or output (N) width is below this stay float: low-precision kernels pad
    # them and run slower than the float kernel.
    min_width: int = 16
    # Quantize the other input of an Add fed by a quantized layer, so the Add fuses into its epilogue.
    residual_adds: bool = True
    # Attention batched matmuls are quantized only when the head size is a multiple of this.
    head_multiple: int = 16


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
    # Ops without weights that the target runs in integer: their inputs and output get Q/DQ, when every
    # input is an activation (an op with a constant operand stays float: its constant would need
    # quantizing too). TFLite has int8 kernels for Add/Mul/Softmax/Logistic/Gelu, for instance.
    int8_ops: frozenset[str] = frozenset()
    # (op, scale, zero point) for outputs whose parameters an integer kernel fixes rather than
    # calibration: TFLite's int8 LOGISTIC and SOFTMAX need (1/256, -128), TANH (1/128, 0).
    fixed_output_qparams: tuple[tuple[str, float, int], ...] = ()
    # Integer-only targets (NPUs such as Qualcomm HTP): every float tensor is quantized and no op may
    # stay float; `insert_qdq_integer` reads the operand rules below instead of the weighted-op ones.
    integer_only: bool = False
    # (op, dtype): ops whose constant input 1 is a weight quantized per tensor in that dtype, symmetric
    # when signed (QNN has no per-channel MatMul; its LayerNorm takes an unsigned asymmetric gamma).
    per_tensor_weights: tuple[tuple[str, QuantDType], ...] = ()
    # Ops whose constant input 2 is a bias, stored int32 at scale s_input * s_weight.
    bias_ops: frozenset[str] = frozenset()
    # (op, input index) of float constants that are parameters, never quantized (Resize scales).
    float_operands: tuple[tuple[str, int], ...] = ()
    # The dtype of other float constants (an Add's beta, a Mul's scalar), asymmetric per tensor;
    # None: the activation dtype.
    constant_dtype: QuantDType | None = None
    # Data-movement ops whose output must carry its input's quantization parameters.
    same_scale_ops: frozenset[str] = frozenset()
    # Ops whose output scale must be a power of two, rounded up from the calibrated one (QNN HTP's 8-bit
    # Softmax adds up to +8% to each row's sum at other scales).
    power_of_two_scale_ops: frozenset[str] = frozenset()
    # Integer-only targets: graph outputs, and the op computing each, at this wider activation dtype
    # (`wide_graph_outputs`); None: the activation dtype.
    output_dtype: QuantDType | None = None
    fallback: PrecisionFallback = PrecisionFallback.FLOAT
    wide_dtype: QuantDType | None = None  # the activation dtype of layers a WIDE fallback takes out
    # Explicit-quantization placement (TensorRT): `plan_quantization` follows these rules instead of the
    # weighted-op ones above; None for the other targets.
    explicit: ExplicitRules | None = None
    # The runtime needs every shape fixed when the file is built (TFLite tensors, QNN graphs): the build
    # pins the graph's dynamic axes (`--shape`, else the calibration data's shapes).
    static_shapes: bool = False
