"""Static-shape targets pin the exported graph's dynamic axes at build time (--shape, else the
calibration data's shapes) and record them; ort-int8 artifacts stay dynamic and refuse --shape."""

from __future__ import annotations

import json

import numpy as np
import pytest

from qcompile.cli import main
from qcompile.models.table import BUILTINS

TINY = "builtin:tiny-sd-unet"


def _npz(tmp_path, h: int = 24, w: int = 20, tokens: int = 12, rows: int = 8):
    adapter = BUILTINS["tiny-sd-unet"].build()
    arrays = adapter.dummy_inputs(batch=rows, seed=3, sizes={"height": h, "width": w, "tokens": tokens})
    arrays["timestep"] = np.linspace(999, 0, rows).astype(np.int64)
    path = tmp_path / f"calib_{h}x{w}_{tokens}.npz"
    np.savez(path, **arrays)
    return path


def _bad(capsys, tmp_path, args, *match):
    out = tmp_path / "out"
    code = main(["build", TINY, "--out", str(out), *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1, err
    assert all(m in err for m in match), err
    assert not out.exists()


@pytest.mark.parametrize("args,match", [
    (["--shape", "sample=1x4x24x24"], ("--shape: target ort-int8 keeps dynamic shapes",)),
    (["--target", "tflite-int8", "--shape", "latents=1x4x24x24"], ("no input 'latents'", "sample, timestep")),
    (["--target", "tflite-int8", "--shape", "sample=1x4x25x24"], ("--shape sample=1x4x25x24", "a multiple of 2")),
    (["--target", "tflite-int8", "--shape", "sample=1x3x24x24"], ("expected (N, 4, height, width)",)),
    (["--target", "tflite-int8", "--shape", "sample=1x4"], ("expected (N, 4, height, width)",)),
    (["--target", "tflite-int8", "--shape", "sample:1x4x8x8"], ("expected NAME=D0xD1x...",)),
    (["--target", "tflite-int8", "--shape", "sample=1x4x24x24", "--shape", "sample=1x4x8x8"], ("given twice",)),
])
def test_bad_shapes_are_one_line(capsys, tmp_path, args, match):
    _bad(capsys, tmp_path, args, *match)


def test_shape_other_than_the_validation_data_is_refused(capsys, tmp_path):
    # synthetic validation inputs are at the model's default 16x16: a 24x24 artifact cannot be checked on them
    _bad(capsys, tmp_path, ["--target", "tflite-int8", "--calib", "synthetic:4", "--shape", "sample=1x4x24x24"],
         "validation inputs have", "give --calib an .npz at those shapes")


def test_tflite_pins_the_calibration_shapes_and_ort_stays_dynamic(capsys, tmp_path):
    npz = _npz(tmp_path)
    tfl, ort = tmp_path / "tflite", tmp_path / "ort"
    assert main(["build", TINY, "--target", "tflite-int8", "--calib", str(npz), "--out", str(tfl)]) == 0
    assert "tflite-int8 is built for sample 1x4x24x20, timestep 1, encoder_hidden_states 1x12x32" \
        in capsys.readouterr().out
    manifest = json.loads((tfl / "manifest.json").read_text())
    assert manifest["input_shapes"] == {"sample": [1, 4, 24, 20], "timestep": [1], "encoder_hidden_states": [1, 12, 32]}
    report = json.loads((tfl / "report.json").read_text())
    assert report["passed"] and report["summary"]["eps_sqnr_db_mean"] > 15.0
    assert main(["build", TINY, "--calib", str(npz), "--out", str(ort)]) == 0
    manifest = json.loads((ort / "manifest.json").read_text())
    assert manifest["input_shapes"] == {}
    sample = next(i for i in manifest["model"]["inputs"] if i["name"] == "sample")
    assert [a["dynamic"] for a in sample["axes"]] == [True, False, True, True]


def test_shape_with_another_batch_than_the_static_batch(capsys, tmp_path):
    npz = _npz(tmp_path)
    _bad(capsys, tmp_path, ["--target", "tflite-int8", "--calib", str(npz), "--shape", "sample=2x4x24x20"],
         "--shape sample=2x4x24x20: tflite-int8 builds for batch 1 (--static-batch)")
