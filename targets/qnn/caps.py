"""What the QNN HTP backend runs, as data for the integer-only Q/DQ pass (`insert_qdq_integer`).

Facts (onnxruntime's QNN quantization helpers and EP, onnxruntime-qnn 2.7.0 / QNN 2.51):
- activations are unsigned asymmetric per tensor (uint8 for W8A8, uint16 for W8A16); weights int8
  symmetric, per output channel for Conv/Gemm, per tensor for MatMul (no per-channel MatMul) and
  InstanceNormalization's scale; LayerNormalization's EP builder is only offered a uint8 asymmetric
  gamma (an int8 one leaves the node unsupported); biases, norms' included, int32 at s_input * s_weight;
- HTP's Sigmoid fixes its output encoding at 16 bits (scale 1/65536, offset 0); the same full-range
  [0, 1) encoding is used at 8 bits, which is what a calibrated range would converge to anyway;
- other constants (an Add's bias, a position embedding, a Mul's scalar) are uint8 asymmetric per tensor
  at both activation widths, as onnxruntime's QNN helpers make them: with 16-bit constants HTP computes
  Add(x, constant) -> LayerNormalization wrong (tiny DiT's patch embedding: 11 dB against the CPU EP on
  the same graph, 60 dB with uint8 constants);
- data-movement ops keep their input's encoding (the converter would otherwise insert requantizes);
- Resize's scales are parameters, never quantized (a quantized `scales` broke models in
  onnxruntime's helpers, ENVIRONMENT.md);
- HTP's 8-bit Softmax requantizes exactly only to a power-of-two output scale: at others below 1/1024
  it rounds up, each row summing to 1.01-1.08 (the CPU EP: 1.000) on the scales the estimators pick
  for flat attention (K=4's high-t buckets); its scale is rounded up to a power of two. At 16 bits
  rows sum to within 0.05% of 1 at any scale, so W8A16 keeps its calibrated scales;
- graph outputs are uint16 at both widths: at W8A8 the op computing an output runs as A16W8 behind a
  uint8 -> uint16 Convert (`wide_graph_outputs`), because HTP rounds an 8-bit output requantization
  lower than onnxruntime does, a bias the sampler integrates.
"""

from __future__ import annotations

from qcompile.caps import PrecisionFallback, TargetCaps
from qcompile.quant import QuantDType

SAME_SCALE_OPS = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Slice", "Split",
                            "Resize", "Gather", "Expand", "Tile", "DepthToSpace", "SpaceToDepth"})
PER_TENSOR_WEIGHTS = (("MatMul", QuantDType.INT8), ("InstanceNormalization", QuantDType.INT8),
                      ("LayerNormalization", QuantDType.UINT8))
BIAS_OPS = frozenset({"Conv", "Gemm", "LayerNormalization", "InstanceNormalization"})
FLOAT_OPERANDS = (("Resize", 1), ("Resize", 2), ("Resize", 3))


def _caps(activation: QuantDType) -> TargetCaps:
    return TargetCaps(
        weight_dtype=QuantDType.INT8,
        activation_dtype=activation,
        activation_symmetric=False,
        integer_only=True,
        static_shapes=True,
        per_tensor_weights=PER_TENSOR_WEIGHTS,
        bias_ops=BIAS_OPS,
        float_operands=FLOAT_OPERANDS,
        same_scale_ops=SAME_SCALE_OPS,
        constant_dtype=QuantDType.UINT8,
        fixed_output_qparams=(("Sigmoid", 1.0 / (activation.qmax + 1), 0),),
        output_dtype=QuantDType.UINT16,
        power_of_two_scale_ops=frozenset({"Softmax"}) if activation.bits == 8 else frozenset(),
        # HTP has no float kernels: mixed precision runs sensitive layers at 16-bit activations (A16W8)
        fallback=PrecisionFallback.WIDE if activation.bits == 8 else PrecisionFallback.NONE,
        wide_dtype=QuantDType.UINT16 if activation.bits == 8 else None,
    )


QNN_W8A8_CAPS = _caps(QuantDType.UINT8)
QNN_W8A16_CAPS = _caps(QuantDType.UINT16)
