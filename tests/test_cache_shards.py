"""Calibration in shards: `calibrate --shard I/N` on each share of the rows, then `merge-cache`, gives the
very cache one machine writes for the same rows (file for file, byte for byte), and shards that do not
belong together are refused in one line with nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from qcompile.calibration.cache import CalibrationCache
from qcompile.calibration.shards import Shard, content_digest
from qcompile.cli import main

MODEL = "builtin:reference"
CALIB = ["--calib", "sample:2", "--steps", "4"]  # 2 samples x CFG halves x 4 steps: 16 rows, 4 batches

pytest.importorskip("qcompile.models.reference_model")


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """The float model exported once; a one-machine cache and shards of the same calibration."""
    root = tmp_path_factory.mktemp("shards")
    exported = root / "export"
    assert main(["export", MODEL, "--out", str(exported)]) == 0

    def calibrate(name: str, *extra: str) -> Path:
        assert main(["calibrate", MODEL, "--from-export", str(exported), "--calib-cache", str(root / name),
                     *CALIB, *extra]) == 0
        return root / name

    made = {"root": root, "whole": calibrate("whole"), "calibrate": calibrate}
    made.update({f"{i}/2": calibrate(f"s{i}of2", "--shard", f"{i}/2") for i in (1, 2)})
    return made


def test_two_shards_merged_are_the_one_machine_cache_byte_for_byte(made, capsys):
    out = made["root"] / "merged2"
    assert main(["merge-cache", str(out), str(made["2/2"]), str(made["1/2"])]) == 0  # any order
    assert _files(out) == _files(made["whole"])
    whole, merged = CalibrationCache.open(made["whole"]), CalibrationCache.open(out)
    assert merged.fingerprint == whole.fingerprint and content_digest(merged) == content_digest(whole)
    a, b = whole.table(), merged.table()
    for name, st in a.tensors.items():
        for field in ("count", "lo", "hi", "chan_absmax", "hist"):
            np.testing.assert_array_equal(getattr(st, field), getattr(b.tensors[name], field), err_msg=name)


def test_each_shard_runs_its_share_and_only_shard_one_ships_the_recording(made):
    metas = [json.loads((made[f"{i}/2"] / "meta.json").read_text())["shard"] for i in (1, 2)]
    assert [m["rows"] for m in metas] == [8, 8]
    assert metas[0]["batches"] == [0, 2] and metas[1]["batches"] == [2, 4]
    assert (made["1/2"] / "recording").is_dir() and not (made["2/2"] / "recording").exists()
    # A shard holds part of the statistics: a build never takes it for a cache.
    code = main(["build", MODEL, "--out", str(made["root"] / "nope"), "--calib-cache", str(made["2/2"])])
    assert code == 2 and not (made["root"] / "nope").exists()


def test_three_uneven_shards_merge_to_the_same_cache(made):
    shards = [made["calibrate"](f"s{i}of3", "--shard", f"{i}/3") for i in (1, 2, 3)]
    out = made["root"] / "merged3"
    assert main(["merge-cache", str(out), *map(str, shards)]) == 0
    assert _files(out) == _files(made["whole"])


@pytest.mark.parametrize("rows", [[4, 4, 4, 4], [16, 16, 3, 16, 1], [5], []])
@pytest.mark.parametrize("count", [1, 2, 3, 7])
def test_the_split_gives_every_batch_to_exactly_one_shard_in_order(rows, count):
    ranges = [Shard(i, count).batches(rows) for i in range(1, count + 1)]
    assert [b for r in ranges for b in r] == list(range(len(rows)))


def _refused(capsys, out: Path, *shards: Path) -> str:
    code = main(["merge-cache", str(out), *map(str, shards)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert not out.exists()  # nothing written
    return err


def _edited(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    meta = json.loads((dst / "meta.json").read_text())
    edit(meta)
    (dst / "meta.json").write_text(json.dumps(meta))
    return dst


def test_shards_that_do_not_belong_together_are_refused_in_one_line(made, tmp_path, capsys):
    out = tmp_path / "out"
    one, two = made["1/2"], made["2/2"]
    assert "overlaps" in _refused(capsys, out, one, two, two)
    assert "missing shard 2/2" in _refused(capsys, out, one)
    # Another recording (other samples): a real calibration of other rows.
    other = made["calibrate"]("other", "--calib", "sample:3", "--shard", "2/2")
    capsys.readouterr()
    assert "not the same recording" in _refused(capsys, out, one, other)
    # Another graph or other observer settings, as the shard's own description says.
    graph = _edited(two, tmp_path / "graph", lambda m: m["fingerprints"].update(graph="sha256:" + "0" * 64))
    assert "not the same graph" in _refused(capsys, out, one, graph)
    settings = _edited(two, tmp_path / "settings", lambda m: m["settings"].update(bins_per_octave=4))
    assert "not the same settings" in _refused(capsys, out, one, settings)
    split = _edited(two, tmp_path / "split", lambda m: m["shard"].update(count=3, index=3))
    assert "not the same shard count" in _refused(capsys, out, one, split)
    assert "not a shard" in _refused(capsys, out, one, made["whole"])
    tampered = tmp_path / "tampered"
    shutil.copytree(two, tampered)
    (tampered / "stats.npz").write_bytes((tampered / "stats.npz").read_bytes()[:-10])
    assert "changed" in _refused(capsys, out, one, tampered)


def test_a_bad_shard_option_is_one_line_before_any_work(made, tmp_path, capsys):
    for bad in ("3/2", "0/2", "1of2"):
        code = main(["calibrate", MODEL, "--calib-cache", str(tmp_path / "c"), "--shard", bad])
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.startswith(f"qcompile: error: --shard {bad}") and len(err.splitlines()) == 1
        assert not (tmp_path / "c").exists()
    code = main(["calibrate", MODEL, "--calib-cache", str(tmp_path / "c"), "--shards", "2"])
    assert code == 2 and "--shards 2: only with --ray" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
