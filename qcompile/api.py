"""qcompile's Python API: what the `qcompile` command runs, callable from a script.

    import qcompile
    qcompile.build("sd-pipeline", "unet-int8", component="unet", target="ort-int8", calib="prompts:prompts.txt")
    pipe.unet = qcompile.load("unet-int8")

`build`, `calibrate` and `load` are importable from `qcompile` itself; `export` only from here
(`qcompile.export` is the module that does the exporting). Keyword arguments are `CompileConfig`'s
fields (qcompile/config.py); options the command line takes as text (`target`, `calib`,
`estimator`, `bucket_method`) may be given as the same text or as their typed values. A problem with
the arguments or the user's files raises `qcompile.errors.UserError`, whose message is the one line
the command line prints.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qcompile.config import BucketMethod, CalibSpec, CompileConfig, Estimator, SamplerSettings, TargetName, parse_shape
from qcompile.errors import UserError

if TYPE_CHECKING:
    from qcompile.calibration.cache import CalibrationCache
    from qcompile.dropin import CompiledComponent
    from qcompile.stages import BuildResult
    from qcompile.target import Runner

__all__ = ["build", "calibrate", "compile_config", "export", "load"]

PathLike = str | os.PathLike


def _as(parse: Callable[[str], Any]) -> Callable[[Any], Any]:
    """A field's value: text parsed as the command line parses it, a typed value as it is."""
    return lambda value: parse(value) if isinstance(value, str) else value


_PARSE: dict[str, Callable[[Any], Any]] = {
    "target": _as(TargetName.parse),
    "calib": _as(CalibSpec.parse),
    "estimator": _as(Estimator.parse),
    "bucket_method": _as(BucketMethod.parse),
    "calib_cache": lambda v: None if v is None else Path(v),
    "export_from": lambda v: None if v is None else Path(v),
    "exclude": tuple,
    "shapes": lambda v: tuple(parse_shape(s) if isinstance(s, str) else s for s in v),
}


def compile_config(model: PathLike, out: PathLike, **settings: Any) -> CompileConfig:
    """The CompileConfig `build` runs: `settings` are its fields by name (`out` is `out_dir`)."""
    known = {f.name for f in dataclasses.fields(CompileConfig)} - {"model", "out_dir"}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise TypeError(f"unknown build setting(s) {', '.join(unknown)}; "
                        f"CompileConfig takes {', '.join(sorted(known))}")
    values = {k: _PARSE[k](v) if k in _PARSE else v for k, v in settings.items()}
    return CompileConfig(model=str(model), out_dir=Path(out), **values)


def build(model: PathLike, out: PathLike, *, component: str | None = None, target: str | TargetName = "ort-int8",
          calib: str | CalibSpec | None = None, **settings: Any) -> BuildResult:
    """Export, calibrate, quantize for `target`, emit into `out` and validate (`qcompile build`).

    `model`: a diffusers model folder, a pipeline folder with `component`, or `builtin:<name>`;
    `calib`: `sample:N`, `synthetic:N`, `prompts:FILE` or an .npz (None: the model's default). Other
    settings are CompileConfig's fields (`buckets=4`, `estimator="mse"`, `exclude=(...)`,
    `target_options=TfliteOptions(batch=2)`, `thresholds=Thresholds(...)`). A build that misses a
    threshold returns with `passed` False and leaves `out` untouched (the artifact is in `<out>.failed`).
    """
    from qcompile.stages import build as run_build

    return run_build(compile_config(model, out, component=component, target=target, calib=calib, **settings))


def calibrate(model: PathLike, cache: PathLike, *, component: str | None = None, calib: str | CalibSpec | None = None,
              sampler: SamplerSettings | None = None, seed: int = 0, opset: int = 20,
              export_from: PathLike | None = None, shard: str | None = None, ray: str | None = None,
              shards: int | None = None) -> CalibrationCache:
    """Record inputs and write a calibration cache into the new folder `cache` (`qcompile calibrate`):
    any number of builds reuse it (`build(..., calib_cache=cache)`) without running the model again.
    `shard="I/N"`: only the I-th of N shares of the statistics, into a shard cache for `merge_cache`.
    `ray`: run `shards` shards (default 2) as tasks on the Ray cluster at this address ('' starts a
    local one) and merge them into `cache`."""
    from qcompile.calibration.shards import Shard
    from qcompile.stages import write_calibration_cache

    if ray is None and shards is not None:
        raise UserError(f"--shards {shards}: only with --ray (one machine's share is --shard I/N)")
    if ray is not None:
        from qcompile.calibration.ray_shards import calibrate_on_ray

        if shard is not None:
            raise UserError("--shard and --ray: choose one (--ray runs every shard itself)")
        settings = {"component": component, "calib": calib, "sampler": sampler, "seed": seed, "opset": opset,
                    "export_from": export_from}
        return calibrate_on_ray(str(model), Path(cache), address=ray, shards=shards or 2, settings=settings)

    return write_calibration_cache(str(model), component, seed=seed, opset=opset, spec=_PARSE["calib"](calib),
                                   cache_dir=Path(cache), sampler=sampler or SamplerSettings(),
                                   export_from=_PARSE["export_from"](export_from),
                                   shard=None if shard is None else Shard.parse(shard))


def merge_cache(out: PathLike, shards: list[PathLike]) -> CalibrationCache:
    """The calibration cache of all the shard caches `shards` (`qcompile merge-cache`), into the new
    folder `out`: equal to the cache one `calibrate` without shards writes for the same rows."""
    from qcompile.calibration.shards import merge_shards

    return merge_shards(Path(out), [Path(s) for s in shards])


def export(model: PathLike, out: PathLike, *, component: str | None = None, seed: int = 0, opset: int = 20) -> Path:
    """The canonical float ONNX alone, verified against torch (`qcompile export`); `load` runs it too."""
    from qcompile.stages import export_only

    return export_only(CompileConfig(model=str(model), component=component, out_dir=Path(out), seed=seed,
                                     opset=opset))


def load(folder: PathLike, *, runner: Runner | None = None) -> CompiledComponent:
    """The artifact in `folder` as the diffusers component it was built from, on its target's runtime:
    `pipe.unet = qcompile.load(DIR)` (a UNet or transformer), `pipe.vae = qcompile.load(DIR)` (a VAE
    decoder). `runner`: a runner of your own instead of the target's default (a QNN artifact on the HTP
    simulator: `QnnW8A8Target().runner(folder, manifest, htp=True)`)."""
    from qcompile.dropin import load as load_component

    return load_component(folder, runner=runner)
