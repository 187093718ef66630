"""Mixed precision goes through each target's own passes, emitter and runner: a .tflite keeps its most
sensitive layers float in the LiteRT interpreter; an integer-only QNN graph, which cannot keep anything
float, computes them with 16-bit activations (A16W8) and still runs whole on the HTP simulator."""

from __future__ import annotations

import json

import pytest

from qcompile.cli import main

MODEL = "builtin:tiny-unet2d"
FAST = ["--calib", "synthetic:6", "--validate", "2"]


def _read(folder):
    return json.loads((folder / "manifest.json").read_text()), json.loads((folder / "report.json").read_text())


def test_tflite_full_integer_mixed_precision_keeps_sensitive_layers_float(tmp_path):
    pytest.importorskip("ai_edge_litert.interpreter", reason="ai-edge-litert is not installed")
    out = tmp_path / "tfl"
    code = main(["build", MODEL, "--target", "tflite-int8", "--full-integer", "--mixed-precision", "32", *FAST,
                 "--out", str(out)])
    folder = out if code == 0 else tmp_path / "tfl.failed"
    manifest, report = _read(folder)
    mixed = manifest["quantization"]["mixed_precision"]
    assert 1 <= len(mixed["layers"]) < manifest["quantization"]["quantized_weights"]
    assert set(mixed["layers"]) == set(manifest["quantization"]["float_layers"])  # what the .tflite keeps float
    assert mixed["reached_sqnr_db"] > mixed["all_quantized_sqnr_db"] + 1.0, mixed
    # the probe measured what ships: the artifact's eps SQNR on held-out inputs is of the same order
    assert report["summary"]["eps_sqnr_db_mean"] > mixed["all_quantized_sqnr_db"], report["summary"]
    assert code == (0 if report["passed"] else 1)
    assert report["checks"]["mixed_precision_target_reached"] == (mixed["reached_sqnr_db"] >= 32)


def test_qnn_w8a8_mixed_precision_widens_layers_and_runs_whole_on_htp(tmp_path):
    from qnn_helpers import require_htp

    require_htp()
    out = tmp_path / "qnn"
    code = main(["build", MODEL, "--target", "qnn-w8a8", "--mixed-precision", "26", "--max-float-layers", "6",
                 "--device-samples", "0", *FAST, "--out", str(out)])
    folder = out if code == 0 else tmp_path / "qnn.failed"
    manifest, report = _read(folder)
    q = manifest["quantization"]
    mixed = q["mixed_precision"]
    assert q["float_layers"] == [] and set(q["wide_layers"]) == set(mixed["layers"]) and 1 <= len(mixed["layers"]) <= 6
    assert mixed["fallback"] == "wide (uint16)"
    assert mixed["reached_sqnr_db"] > mixed["all_quantized_sqnr_db"], mixed
    widen = next(e for e in manifest["pass_log"] if e["pass"] == "widen-activations")
    assert widen["modified"] and "activations at uint16" in widen["detail"]
    # the mixed 8/16-bit graph runs whole on HTP (CPU fallback disabled) and agrees with the CPU EP
    assert report["checks"]["htp_deterministic"] and report["checks"]["htp_agrees_with_cpu_ep"], report["device"]
    assert code == (0 if report["passed"] else 1)


def test_mixed_precision_is_refused_where_nothing_can_fall_back(tmp_path, capsys):
    code = main(["build", MODEL, "--target", "qnn-w8a16", "--mixed-precision", "30", *FAST,
                 "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "qnn-w8a16 has no precision to fall back to (activations are uint16 everywhere)" in err
