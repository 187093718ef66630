"""The prompt-steering gate: a build whose quantization error of (cond - uncond) exceeds the allowed
fraction of the float guidance signal at some step misses its threshold (exit 1, the artifact beside
--out, the report saying which check), and the same artifact passes a gate its guidance clears."""

from __future__ import annotations

import json

from qcompile.cli import main


def test_gate_fails_a_build_whose_guidance_is_below_the_quantization_error(tmp_path, capsys):
    out = tmp_path / "artifact"
    # Settings kept small: 4 DDIM steps, one image per class; the gate is what is tested.
    code = main(["build", "builtin:reference", "--out", str(out), "--calib", "synthetic:8", "--steps", "4",
                 "--per-class", "1", "--min-psnr-db", "0", "--max-cfg-gap", "0.01"])
    printed = capsys.readouterr().out
    assert code == 1 and not out.exists()
    failed = out.with_name(out.name + ".failed")
    report = json.loads((failed / "report.json").read_text())
    gaps = [s["cfg_gap_ratio"] for s in report["per_step"]]
    assert len(gaps) == 4 and all(g is not None and g > 0 for g in gaps)
    assert report["summary"]["cfg_gap_ratio_max"] == max(gaps) > 0.01
    assert report["checks"]["cfg_gap_ratio_max"] is False and not report["passed"]
    assert "threshold missed cfg_gap_ratio_max" in printed and "CFG-gap ratio  max" in printed

    # The same artifact judged with a gate above its largest step passes it.
    limit = max(gaps) * 1.5
    assert main(["eval", str(failed), "--steps", "4", "--per-class", "1", "--min-psnr-db", "0",
                 "--max-cfg-gap", str(limit)]) == 0
    again = json.loads((failed / "report.json").read_text())
    assert again["checks"]["cfg_gap_ratio_max"] is True and again["thresholds"]["cfg_gap_ratio_max"] == limit


def test_gate_value_must_be_positive(tmp_path, capsys):
    out = tmp_path / "artifact"
    assert main(["build", "builtin:reference", "--out", str(out), "--max-cfg-gap", "nan"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--max-cfg-gap nan" in err[0] and not out.exists()
