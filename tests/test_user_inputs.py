"""Calibration files as users have them: diffusers' dtypes are cast, bad files are one line and exit 2."""

from __future__ import annotations

import json

import numpy as np

from qcompile.cli import main
from qcompile.models.table import BUILTINS

TINY = "builtin:tiny-sd-unet"


def _arrays(count: int = 6, seed: int = 0) -> dict[str, np.ndarray]:
    """What a diffusers script records: int64 timesteps from the scheduler, fp16 latents, fp32 text."""
    adapter = BUILTINS["tiny-sd-unet"].build()
    rng = np.random.default_rng(seed)
    arrays = adapter.dummy_inputs(batch=count, seed=seed)
    arrays["timestep"] = rng.integers(0, 1000, size=count).astype(np.int64)
    arrays["sample"] = arrays["sample"].astype(np.float16)
    arrays["encoder_hidden_states"] = arrays["encoder_hidden_states"].astype(np.float64)
    return arrays


def _bad(capsys, tmp_path, arrays: dict[str, np.ndarray], *match: str) -> None:
    npz = tmp_path / "calib.npz"
    np.savez(npz, **arrays)
    out = tmp_path / "out"
    code = main(["build", TINY, "--out", str(out), "--calib", str(npz)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1, err
    for m in (str(npz), *match):
        assert m in err, err
    assert not out.exists()
    assert not list(tmp_path.glob(".out*")), "a staging folder was left"


def test_nan_and_inf(capsys, tmp_path):
    a = _arrays()
    a["sample"][2, 0, 0, 0] = np.nan
    _bad(capsys, tmp_path, a, "'sample'", "NaN/Inf", "row 2", "(6, 4, 16, 16)")
    a = _arrays()
    a["encoder_hidden_states"][4, 1, 1] = np.inf
    _bad(capsys, tmp_path, a, "'encoder_hidden_states'", "NaN/Inf", "row 4")


def test_empty_array(capsys, tmp_path):
    a = _arrays()
    a["sample"] = a["sample"][:0]
    _bad(capsys, tmp_path, a, "'sample'", "empty", "(0, 4, 16, 16)", "expected (N, 4,")


def test_missing_key(capsys, tmp_path):
    a = _arrays()
    del a["timestep"]
    _bad(capsys, tmp_path, a, "missing key(s) 'timestep'")


def test_key_the_model_does_not_take(capsys, tmp_path):
    a = _arrays()
    a["guidance_scale"] = np.ones(6, np.float32)
    _bad(capsys, tmp_path, a, "'guidance_scale'", "not inputs of this model", "sample, timestep, encoder_hidden_states")


def test_shape_no_axis_value_explains(capsys, tmp_path):
    a = _arrays()
    a["sample"] = np.zeros((6, 3, 16, 16), np.float16)  # 3 channels: the model has 4
    _bad(capsys, tmp_path, a, "'sample'", "shape (6, 3, 16, 16)", "expected (N, 4,")
    a = _arrays()
    a["sample"] = np.zeros((6, 4, 17, 16), np.float16)  # no latent height is odd
    _bad(capsys, tmp_path, a, "'sample'", "shape (6, 4, 17, 16)")
    a = _arrays()
    a["encoder_hidden_states"] = a["encoder_hidden_states"][..., :8]  # not the cross-attention width
    _bad(capsys, tmp_path, a, "'encoder_hidden_states'", "expected (N,")


def test_different_sample_counts(capsys, tmp_path):
    a = _arrays()
    a["timestep"] = a["timestep"][:5]
    _bad(capsys, tmp_path, a, "different sample counts")


def test_not_numbers(capsys, tmp_path):
    a = _arrays()
    a["timestep"] = np.array(["t"] * 6)
    _bad(capsys, tmp_path, a, "'timestep'", "expected numbers")


def test_diffusers_dtypes_are_cast_and_build(capsys, tmp_path):
    npz = tmp_path / "calib.npz"
    np.savez(npz, **_arrays(count=8))
    out = tmp_path / "out"
    code = main(["build", TINY, "--out", str(out), "--calib", str(npz), "--validate", "4"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    casts = [line for line in captured.out.splitlines() if "cast to the graph's input dtypes" in line]
    assert len(casts) == 1 and "timestep int64->float32" in casts[0] and "sample float16->float32" in casts[0] \
        and "encoder_hidden_states float64->float32" in casts[0], casts
    report = json.loads((out / "report.json").read_text())
    assert report["summary"]["eps_sqnr_db_mean"] > 15.0  # tiny random UNet, 6 calibration rows


def test_model_folders_load_safetensors_first_and_never_the_hub(tmp_path, caplog):
    import torch

    from qcompile.models.common import safe_loading
    from qcompile.models.source import resolve_model

    module = BUILTINS["tiny-unet2d"].build().module
    safe, pickled = tmp_path / "safe", tmp_path / "pickled"
    module.save_pretrained(safe)
    module.save_pretrained(pickled, safe_serialization=False)
    assert safe_loading(safe) == {"local_files_only": True, "use_safetensors": True}
    assert safe_loading(pickled) == {"local_files_only": True, "use_safetensors": False}
    with caplog.at_level("WARNING", logger="qcompile.models"):
        loaded = resolve_model(str(pickled)).module
    assert "no .safetensors weights" in caplog.text
    for folder in (safe, loaded):
        got = resolve_model(str(safe)).module if folder is safe else loaded
        for (name, a), b in zip(module.state_dict().items(), got.state_dict().values(), strict=True):
            assert torch.equal(a, b), name
