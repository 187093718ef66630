"""Property: every canonicalize pass and every graph rewrite the targets use preserves float numerics
(onnxruntime, rtol 1e-5, atol 1e-6) on random small graphs (tests/fuzz_graphs.py).

Profiles (hypothesis, derandomized: the same graphs on every run): `QCOMPILE_FUZZ_PROFILE=ci` (the
default, 40 graphs) or `QCOMPILE_FUZZ_PROFILE=nightly` (400 graphs). Run with
`--hypothesis-show-statistics` to see which passes rewrote how many graphs.
"""

from fuzz_checks import check_float_passes, fuzz_settings
from fuzz_graphs import graph_specs
from hypothesis import event, given


@fuzz_settings(ci=40, nightly=400)
@given(graph_specs())
def test_passes_preserve_float_numerics(spec):
    for outcome in check_float_passes(spec):
        if outcome.modified:
            event(f"rewrote: {outcome.name}")
