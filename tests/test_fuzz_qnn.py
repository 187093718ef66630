"""Property: the QNN target's integer-only Q/DQ graph runs whole on the HTP simulator (CPU fallback
disabled) and agrees with onnxruntime's CPU EP running the same graph, on random small graphs
(tests/fuzz_graphs.py) calibrated on random inputs.

Profiles (hypothesis, derandomized): `QCOMPILE_FUZZ_PROFILE=ci` (the default, 12 graphs) or
`nightly` (150 graphs).
"""

import pytest
from fuzz_checks import check_qnn, fuzz_settings
from fuzz_graphs import EVERYTHING, graph_specs
from hypothesis import event, given
from hypothesis import strategies as st
from qnn_helpers import require_htp

QNN_OPS = EVERYTHING


@pytest.fixture(autouse=True)
def _htp():
    require_htp()


@fuzz_settings(ci=12, nightly=150)
@given(graph_specs(QNN_OPS), st.sampled_from([8, 16]))
def test_qnn_htp_agrees_with_the_cpu_ep(spec, bits):
    from qcompile.targets.qnn.caps import QNN_W8A8_CAPS, QNN_W8A16_CAPS

    outcome = check_qnn(spec, QNN_W8A8_CAPS if bits == 8 else QNN_W8A16_CAPS)
    print(outcome, spec)
    event(f"W8A{bits} local max LSB: {outcome.local_max_lsb:.0f}")
    assert outcome.deterministic, outcome
