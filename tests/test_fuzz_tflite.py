"""Property: the TFLite emitter agrees with onnxruntime running the same Q/DQ graph, on random small
graphs (tests/fuzz_graphs.py) planned with the TFLite caps and calibrated on random inputs.

Every int8 tensor of the .tflite is within 1 LSB of onnxruntime's when both compute it from the
interpreter's own upstream int8 tensors (what `TfliteInt8Target.device_checks` requires), and the
float output, computed the same way, within 1 step of its own 8-bit range.

Profiles (hypothesis, derandomized): `QCOMPILE_FUZZ_PROFILE=ci` (the default, 40 graphs) or
`nightly` (300 graphs).
"""

import pytest
from fuzz_checks import check_tflite, fuzz_settings
from fuzz_graphs import IMAGE_EXAMPLE, TOKEN_EXAMPLE, OpSet, graph_specs
from hypothesis import event, example, given
from hypothesis import strategies as st

pytest.importorskip("ai_edge_litert.interpreter", reason="ai-edge-litert is not installed")

# What the lowering refuses, in one line naming the op (UserError), kept out of the property:
# - grouped convolution other than depthwise (TFLite has none; ops_nn.lower_conv);
# - Erf, i.e. GELU spelled out as x * 0.5 * (1 + Erf(x / sqrt 2)) (TFLite has no ERF builtin, and the
#   tflite targets' pipelines do not run FuseGelu; test_fuzz_found.py pins the one-line refusal).
TFLITE_OPS = OpSet(grouped_conv=False, excluded=frozenset({"GeluErf"}))


@fuzz_settings(ci=40, nightly=300)
@given(graph_specs(TFLITE_OPS, weighted=True), st.sampled_from(["int8", "int8-wide"]))
@example(IMAGE_EXAMPLE, "int8")
@example(TOKEN_EXAMPLE, "int8-wide")
def test_tflite_agrees_with_onnxruntime_on_the_qdq_graph(spec, caps_name):
    from qcompile.targets.tflite.caps import TFLITE_INT8_CAPS, TFLITE_INT8_WIDE_CAPS

    caps = {"int8": TFLITE_INT8_CAPS, "int8-wide": TFLITE_INT8_WIDE_CAPS}[caps_name]
    outcome = check_tflite(spec, caps)
    print(outcome)
    event(f"int8 tensors: {min(outcome.int8_tensors, 5)}{'+' if outcome.int8_tensors >= 5 else ''}")
    event(f"end-to-end max LSB: {outcome.end_to_end_max_lsb}")
    assert outcome.local_max_lsb <= 1, outcome
    assert outcome.output_local_lsb <= 1.0, outcome
