"""`qcompile calibrate --ray`: the shards as tasks on a local Ray instance (2 CPUs), merged into the very
cache one machine writes for the same rows; a shard that keeps failing fails the calibration naming it."""

from __future__ import annotations

from pathlib import Path

import pytest

from qcompile.cli import main

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'qcompile[ray]')")
pytest.importorskip("qcompile.models.reference_model")

MODEL = "builtin:reference"
CALIB = ["--calib", "sample:2", "--steps", "4"]


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray")
    assert main(["export", MODEL, "--out", str(root / "export")]) == 0
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield root
    ray.shutdown()


def test_the_ray_built_cache_is_the_one_machine_cache_byte_for_byte(local_ray):
    args = ["calibrate", MODEL, "--from-export", str(local_ray / "export"), *CALIB]
    assert main([*args, "--calib-cache", str(local_ray / "whole")]) == 0
    assert main([*args, "--calib-cache", str(local_ray / "on-ray"), "--ray", "--shards", "3"]) == 0
    assert _files(local_ray / "on-ray") == _files(local_ray / "whole")
    assert not list(local_ray.glob(".on-ray.*"))  # the shards' files are gone once merged


def test_a_shard_that_keeps_failing_fails_the_calibration_naming_it(local_ray, tmp_path, capsys):
    out = tmp_path / "cache"
    code = main(["calibrate", MODEL, "--from-export", str(tmp_path / "absent"), *CALIB, "--calib-cache", str(out),
                 "--ray", "--shards", "2"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "--ray: shard " in err and "/2 failed 3 times (UserError" in err, err
    assert not out.exists()
