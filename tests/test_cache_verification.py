"""A calibration cache is verified, not trusted: what was edited, cut or recorded from other data is
refused in one line naming the cache, and the manifest records what a build really calibrated on."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from qcompile.cli import main

TINY = "builtin:tiny-unet2d"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cache") / "c"
    assert main(["calibrate", TINY, "--calib-cache", str(folder), "--calib", "synthetic:6"]) == 0
    return folder


def _copy(cache, tmp_path):
    dst = tmp_path / "c"
    shutil.copytree(cache, dst)
    return dst


def _build(capsys, tmp_path, cache, *extra):
    out = tmp_path / "out"
    code = main(["build", TINY, "--out", str(out), "--calib-cache", str(cache), "--validate", "3", *extra])
    err = capsys.readouterr().err.strip()
    return code, err, out


def test_a_reused_cache_is_recorded_as_what_it_was_calibrated_on(cache, tmp_path, capsys):
    code, err, out = _build(capsys, tmp_path, cache)
    assert code == 0, err
    assert json.loads((out / "manifest.json").read_text())["calibration"]["spec"] == "synthetic:6"


def test_a_cache_from_other_inputs_than_calib_asks_for_is_refused(cache, tmp_path, capsys):
    code, err, out = _build(capsys, tmp_path, cache, "--calib", "synthetic:8")
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "recorded from synthetic:6, but --calib asks for synthetic:8" in err and not out.exists()


def test_edited_statistics_are_refused(cache, tmp_path, capsys):
    edited = _copy(cache, tmp_path)
    with np.load(edited / "stats.npz") as data:
        arrays = {k: data[k] for k in data.files}
    arrays["t3.hi"] = arrays["t3.hi"] * 2
    np.savez_compressed(edited / "stats.npz", **arrays)
    code, err, _ = _build(capsys, tmp_path, edited)
    assert code == 2 and "stats.npz changed since the cache was written" in err and len(err.splitlines()) == 1


def test_a_cut_timestep_table_is_refused(cache, tmp_path, capsys):
    cut = _copy(cache, tmp_path)
    meta = json.loads((cut / "meta.json").read_text())
    meta["timesteps"] = meta["timesteps"][:-2]
    (cut / "meta.json").write_text(json.dumps(meta))
    code, err, _ = _build(capsys, tmp_path, cut)
    assert code == 2 and "rows of statistics for 4 timesteps; the cache is damaged" in err, err


def test_a_missing_tensor_is_refused_not_left_float(cache, tmp_path, capsys):
    cut = _copy(cache, tmp_path)
    meta = json.loads((cut / "meta.json").read_text())
    meta["tensors"] = meta["tensors"][:5] + meta["tensors"][40:]  # statistics of 35 tensors disappear
    (cut / "meta.json").write_text(json.dumps(meta))
    code, err, _ = _build(capsys, tmp_path, cut)
    assert code == 2 and "no statistics for" in err and "the cache is incomplete" in err, err


def test_a_corrupt_recording_is_refused(cache, tmp_path, capsys):
    bad = _copy(cache, tmp_path)
    shard = next((bad / "recording").glob("shard_*.npz"))
    shard.write_bytes(shard.read_bytes()[:100])
    code, err, _ = _build(capsys, tmp_path, bad)
    assert code == 2 and "its recording changed since the cache was written" in err, err
