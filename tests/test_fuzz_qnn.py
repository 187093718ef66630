"""Property: the QNN target's integer-only Q/DQ graph runs whole on the HTP simulator (CPU fallback
disabled), deterministically, and agrees with onnxruntime's CPU EP running the same graph, on random
small graphs (tests/fuzz_graphs.py) calibrated on random inputs.

HTP is not bit-exact with the CPU EP (targets/qnn/README.md): its requantizations round differently,
and end to end those differences compound through gains that depend on the graph (a norm over a
near-constant row turns one input LSB into a full-scale difference). So every quantized activation is
compared locally: the CPU EP computes each op from HTP's own upstream values, and the two may differ
by at most `QNN_LOCAL_LSB` steps of that tensor's scale (3 for 8-bit tensors, 256 for 16-bit ones: the
measurements behind them are in fuzz_checks.py). The end-to-end output SQNR is reported as a
hypothesis event (`--hypothesis-show-statistics`).

What HTP refuses, kept out of the property and pinned in tests/test_fuzz_found.py:
- Erf (GELU spelled out): the QNN EP has no Erf and the qnn pipeline does not run FuseGelu;
- RMSNormalization (and so a decomposed LayerNorm, whose RMS part FuseRMSNorm fuses) over an axis of
  size 1: finalize fails with QNN_COMMON_ERROR_MEM_ALLOC;
- a graph input outside its calibrated range: HTP does not saturate it at that range when the op
  reading it requantizes to a wider one (a Concat), and a graph that only moves data on one element
  per sample returns the float input unquantized; a Concat of a Concat is not saturated at the inner
  one's range. The held-out inputs are part of the calibration, so no tensor leaves its range.

Found and not fixed (pinned as a strict xfail in tests/test_fuzz_found.py, skipped here): a tensor that
is zero throughout calibration gets scale 1e-8, and the int32 bias of a Conv/Gemm reading it
saturates (its scale is 1e-8 * s_w); HTP and the CPU EP then disagree by ~200 LSB.

Profiles (hypothesis, derandomized): `QCOMPILE_FUZZ_PROFILE=ci` (the default, 24 graphs) or
`nightly` (200 graphs).
"""

import math

import pytest
from fuzz_checks import QNN_LOCAL_LSB, check_qnn, fuzz_settings
from fuzz_graphs import IMAGE_EXAMPLE, TOKEN_EXAMPLE, OpSet, graph_specs, moves_data_only
from hypothesis import assume, event, example, given
from hypothesis import strategies as st
from qnn_helpers import require_htp

QNN_OPS = OpSet(unit_norms=False, excluded=frozenset({"GeluErf"}))


@pytest.fixture(autouse=True)
def _htp():
    require_htp()


@fuzz_settings(ci=24, nightly=200)
@given(graph_specs(QNN_OPS), st.sampled_from([8, 16]))
@example(IMAGE_EXAMPLE, 8)
@example(TOKEN_EXAMPLE, 16)
def test_qnn_htp_agrees_with_the_cpu_ep(spec, bits):
    from qcompile.targets.qnn.caps import QNN_W8A8_CAPS, QNN_W8A16_CAPS

    assume(not (moves_data_only(spec) and math.prod(spec.shape[1:]) == 1))
    outcome = check_qnn(spec, QNN_W8A8_CAPS if bits == 8 else QNN_W8A16_CAPS)
    print(outcome, spec)
    assume(not outcome.zero_range)  # a known bug, pinned in test_fuzz_found.py
    for width, lsb in outcome.local_max_lsb.items():
        event(f"W8A{bits}, {width}-bit tensors: local max LSB {math.ceil(lsb)}")
    band = "<30" if outcome.sqnr_db < 30 else "30-60" if outcome.sqnr_db < 60 else ">=60"
    event(f"W8A{bits} output end to end: SQNR {band} dB")
    assert outcome.deterministic, outcome
    assert outcome.within(QNN_LOCAL_LSB), outcome
