"""qcompile.api: keyword arguments become the CompileConfig the command line would make."""

from pathlib import Path

import pytest

from qcompile import api
from qcompile.config import BucketMethod, CalibKind, CalibSpec, Estimator, TargetName
from qcompile.errors import UserError


def test_settings_take_the_command_lines_text_or_typed_values(tmp_path):
    npz = tmp_path / "calib.npz"
    npz.write_bytes(b"")
    cfg = api.compile_config("builtin:tiny-sd-unet", tmp_path / "out", target="tflite-int8", calib=str(npz),
                             estimator="mse", bucket_method="uniform", buckets=3, exclude=["conv_in"],
                             calib_cache=str(tmp_path / "stats"))
    assert cfg.target is TargetName.TFLITE_INT8 and cfg.estimator is Estimator.MSE
    assert cfg.bucket_method is BucketMethod.UNIFORM and cfg.buckets == 3 and cfg.exclude == ("conv_in",)
    assert cfg.calib == CalibSpec(CalibKind.FILE, path=npz) and cfg.calib_cache == tmp_path / "stats"
    assert cfg.out_dir == tmp_path / "out" and isinstance(cfg.out_dir, Path)
    typed = api.compile_config("builtin:tiny-sd-unet", "out", target=TargetName.QNN_W8A8, estimator=Estimator.MAX,
                               calib=CalibSpec(CalibKind.SYNTHETIC, count=4))
    assert typed.target is TargetName.QNN_W8A8 and typed.calib.count == 4


def test_bad_settings_are_refused_before_any_work(tmp_path):
    with pytest.raises(TypeError, match="unknown build setting.*bucket"):
        api.compile_config("builtin:tiny-sd-unet", tmp_path / "out", bucket=2)
    with pytest.raises(UserError, match="--target tflite: unknown"):
        api.build("builtin:tiny-sd-unet", tmp_path / "out", target="tflite")
    with pytest.raises(UserError, match="--buckets 0"):
        api.build("builtin:tiny-sd-unet", tmp_path / "out", buckets=0)
    assert not (tmp_path / "out").exists()


def test_the_package_names_the_api():
    import qcompile

    assert qcompile.build is api.build and qcompile.calibrate is api.calibrate and qcompile.load is api.load
    assert {"build", "calibrate", "load"} <= set(dir(qcompile))
    with pytest.raises(AttributeError):
        qcompile.no_such_thing  # noqa: B018
