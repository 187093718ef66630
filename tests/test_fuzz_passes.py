"""Property: every canonicalize pass and every graph rewrite the targets use preserves float numerics
in onnxruntime on random small graphs (tests/fuzz_graphs.py): max |rewritten - original| <= 1e-6 +
1e-5 * max |original| per output (tests/fuzz_checks.py says why the tolerance is per tensor).

Profiles (hypothesis, derandomized: the same graphs on every run): `QCOMPILE_FUZZ_PROFILE=ci` (the
default, 60 graphs) or `QCOMPILE_FUZZ_PROFILE=nightly` (400 graphs); two fixed graphs run first in
both, so every pass rewrites something whatever is drawn. Run with `--hypothesis-show-statistics` to
see which passes rewrote how many graphs.
"""

import dataclasses

from fuzz_checks import check_float_passes, fuzz_settings
from fuzz_graphs import IMAGE_EXAMPLE, TOKEN_EXAMPLE, Act, graph_specs
from hypothesis import event, example, given

# The token example with a GELU spelled out (Erf), for FuseGelu: the emitters' properties leave it out.
DECOMPOSED_EXAMPLE = dataclasses.replace(TOKEN_EXAMPLE, blocks=(*TOKEN_EXAMPLE.blocks[:-1], Act("GeluErf"),
                                                                 TOKEN_EXAMPLE.blocks[-1]))


@fuzz_settings(ci=60, nightly=400)
@given(graph_specs())
@example(IMAGE_EXAMPLE)
@example(DECOMPOSED_EXAMPLE)
def test_passes_preserve_float_numerics(spec):
    for outcome in check_float_passes(spec):
        if outcome.modified:
            event(f"rewrote: {outcome.name}")
