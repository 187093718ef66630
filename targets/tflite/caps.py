"""What the TFLite int8 kernels accept, as data for plan_quantization / InsertQDQ.

From the TFLite 8-bit quantization spec: weights of CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED are
int8 symmetric per output channel (zero point 0); activations int8 asymmetric per tensor; biases
int32 with scale s_in * s_w. Integer kernels produce an int8 output, so outputs of the weighted ops
are quantized too. Attention's activation x activation MatMuls stay float: TFLite has an int8
BATCH_MATMUL, but XNNPACK does not delegate it, so each one splits the delegated graph and runs
TFLite's scalar reference kernel (perf on the reference model: 15% of the int8 time, and int8 slower
than fp32 until they went float; 38 XNNPACK partitions then, 3 now with SLICE for Split).
"""

from __future__ import annotations

import dataclasses

from qcompile.caps import WEIGHTED_OPS, TargetCaps
from qcompile.quant import QuantDType

TFLITE_INT8_CAPS = TargetCaps(
    weight_dtype=QuantDType.INT8,
    activation_dtype=QuantDType.INT8,
    activation_symmetric=False,
    quantize_outputs_of=WEIGHTED_OPS,
    quantize_bias=True,
    activation_matmul=False,
    static_shapes=True,
)

# The float baseline: nothing is quantized (plan_quantization finds no weighted op).
TFLITE_FP32_CAPS = TargetCaps(
    weight_dtype=QuantDType.INT8,
    activation_dtype=QuantDType.INT8,
    activation_symmetric=False,
    weighted_ops=frozenset(),
    quantize_bias=False,
    static_shapes=True,
)

# TFLite's integer kernels with fixed output parameters (LOGISTIC and SOFTMAX: scale 1/256, zero point
# -128; TANH: 1/128, 0), from the TFLite 8-bit quantization spec.
FIXED_OUTPUT_QPARAMS = (("Sigmoid", 1 / 256, -128), ("Softmax", 1 / 256, -128), ("Tanh", 1 / 128, 0))

# More of the graph in int8 (fewer float islands, more quantization error): activations, softmax and
# activation x activation Add/Mul as well. On the tiny SD UNet (synthetic:8 calibration) eps cosine
# min is 0.9966 with these against 0.9981 with TFLITE_INT8_CAPS; normalizations stay float either way.
TFLITE_INT8_WIDE_CAPS = dataclasses.replace(
    TFLITE_INT8_CAPS,
    int8_ops=frozenset({"Add", "Mul", "Sigmoid", "Softmax", "Tanh", "Gelu"}),
    fixed_output_qparams=FIXED_OUTPUT_QPARAMS,
)
