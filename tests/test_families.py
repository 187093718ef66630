"""Every model family builds for ort-int8 end to end: export verified, quantized, run, reported.

Random tiny weights say little about quality; the thresholds are floors that catch a broken
placement (measured values are in the README's results table, about 0.998-1.0 cosine).
"""

import pytest

from qcompile.config import CalibSpec, CompileConfig
from qcompile.stages import build

FAMILIES = ["builtin:tiny-unet2d", "builtin:tiny-sd-unet", "builtin:tiny-sdxl-unet", "builtin:tiny-dit",
            "builtin:tiny-pixart", "builtin:tiny-sd3", "builtin:tiny-flux", "builtin:tiny-vae-decoder",
            "builtin:tiny-vae-encoder", "builtin:tiny-clip-text"]


@pytest.mark.parametrize("model", FAMILIES)
def test_family_builds_for_ort_int8(model, tmp_path):
    cfg = CompileConfig(model=model, out_dir=tmp_path / "out", calib=CalibSpec.parse("synthetic:8"), validate_count=4)
    result = build(cfg)
    s, m = result.report["summary"], result.manifest
    assert m.export.max_abs_diff_vs_torch <= 1e-4
    assert m.quantization.quantized_weights > 0
    assert s["eps_cos_min"] > 0.99, s
    assert s["eps_sqnr_db_mean"] > 20.0, s
    assert s["size_bytes"] < 0.9 * s["fp32_size_bytes"]
    assert result.passed
