"""The calibration stage: record inputs, replay them through the float graph, cache the statistics.

Calibration runs the model, so it is a stage, not a pass. Its product is a CalibrationCache; scales
are decided later, per target, estimator and bucket, from the cached statistics alone.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import onnx_graphsurgeon as gs

from qcompile.artifact import file_fingerprint
from qcompile.calibration.cache import RECORDING_DIR, CalibrationCache
from qcompile.calibration.inputs import InputSet, load_npz, synthetic_inputs, unbatched_inputs
from qcompile.calibration.pipeline_recorder import read_prompts, record_pipeline, split_prompts
from qcompile.calibration.recorder import Recording, record_input_set, record_sampling
from qcompile.calibration.shards import Shard
from qcompile.calibration.stats import batch_rows, collect_stats
from qcompile.config import CalibKind, CalibSpec, SamplerSettings
from qcompile.errors import UserError
from qcompile.graph_io import module_path
from qcompile.runtime import OnnxRunner

# Calibration sampling uses other seeds than evaluation, so a build is never judged on its own data.
CALIB_SEED_OFFSET = 50_021


def default_calib(adapter) -> CalibSpec:
    """Real trajectories for models that can sample, synthetic inputs otherwise."""
    return CalibSpec(CalibKind.SAMPLE, count=32) if adapter.sampling() is not None else \
        CalibSpec(CalibKind.SYNTHETIC, count=16)


def graph_fingerprint(fp32_path: Path) -> str:
    return file_fingerprint([fp32_path, fp32_path.with_name(fp32_path.name + ".data")])


def user_inputs(spec: CalibSpec, adapter, timestep_name: str | None) -> InputSet:
    return load_npz(spec.path, adapter.input_specs(), adapter.input_axes(), timestep_name)


def record(spec: CalibSpec, adapter, fp32_path: Path, folder: Path, *, names: tuple[str | None, str | None],
           sampler: SamplerSettings, seed: int, inputs: InputSet | None = None,
           pipeline: tuple[Path, str] | None = None) -> Recording:
    """Write the recording of `spec` into `folder`. `inputs` overrides what a FILE spec would load
    (the build holds part of the user's file back for validation); `pipeline` (folder, component) is
    what a PROMPTS spec runs."""
    sample_name, timestep_name = names
    source = spec_source(spec)
    if spec.kind is CalibKind.PROMPTS:
        if pipeline is None:
            raise UserError(f"--calib {spec.describe()}: needs a diffusers pipeline folder as MODEL, with --component")
        calibration, _ = split_prompts(read_prompts(spec.path))
        return record_pipeline(pipeline[0], pipeline[1], calibration, adapter, folder,
                               steps=sampler.steps, guidance=sampler.guidance, seed=seed + CALIB_SEED_OFFSET,
                               unbatched=unbatched_inputs(adapter), source=source)
    if spec.kind is CalibKind.SAMPLE:
        setup = adapter.sampling()
        if setup is None or timestep_name is None:
            raise UserError(f"--calib {spec.describe()}: this model has no sampling loop; use synthetic:N or an .npz")
        runner = OnnxRunner([fp32_path], timestep_name=timestep_name, sample_name=sample_name)
        settings = SamplerSettings(scheduler=sampler.scheduler, steps=sampler.steps, guidance=sampler.guidance,
                                   seed=sampler.seed + CALIB_SEED_OFFSET)
        return record_sampling(runner.run, setup, settings, spec.count, folder, sample_name=sample_name,
                               timestep_name=timestep_name, source=source)
    if inputs is None:
        inputs = synthetic_inputs(adapter, spec.count, seed) if spec.kind is CalibKind.SYNTHETIC else \
            user_inputs(spec, adapter, timestep_name)
    return record_input_set(inputs, folder, source)


def calibrate(spec: CalibSpec, adapter, fp32_path: Path, graph: gs.Graph, cache_dir: Path, *,
              shard: Shard | None = None, **kwargs) -> CalibrationCache:
    """Record and compute statistics into `cache_dir` (a new cache); with `shard`, a shard cache holding
    that shard's statistics (see `shards.py`), and the recording only in shard 1."""
    recording = record(spec, adapter, fp32_path, Path(cache_dir) / RECORDING_DIR, **kwargs)
    rows = batch_rows(recording)
    table = collect_stats(fp32_path, graph, recording, batches=None if shard is None else shard.batches(rows))
    cache = CalibrationCache.create(cache_dir, graph_fingerprint=graph_fingerprint(fp32_path), recording=recording,
                                    table=table, source=recording.meta["source"], producers=producers(graph),
                                    shard=None if shard is None else shard.meta(recording, rows))
    if shard is not None and shard.index > 1:  # shard 1 ships the recording; the others, statistics alone
        shutil.rmtree(recording.folder)
    return cache


def producers(graph: gs.Graph) -> dict[str, str]:
    """'module.path (Op)' of the node computing each tensor; 'input' for graph inputs."""
    out = {t.name: "input" for t in graph.inputs}
    for node in graph.nodes:
        label = f"{module_path(node) or node.name} ({node.op})"
        out.update({t.name: label for t in node.outputs})
    return out


def spec_source(spec: CalibSpec) -> dict[str, str]:
    """What a recording records of where its inputs came from: the spec, and for a file its content's
    fingerprint (the same path with other contents is other data)."""
    source = {"calib": spec.describe()}
    if spec.path is not None and spec.path.is_file():
        source["input_fingerprint"] = file_fingerprint([spec.path])
    return source


def open_or_calibrate(spec: CalibSpec, adapter, fp32_path: Path, graph: gs.Graph, cache_dir: Path, *,
                      explicit: bool = False, **kwargs) -> tuple[CalibrationCache, float, bool]:
    """(cache, seconds, reused): an existing cache in `cache_dir` is reused, but only for the same graph,
    and, when the user named the calibration (`explicit`), only if it was recorded from it."""
    t0 = time.perf_counter()
    if CalibrationCache.exists(cache_dir):
        cache = CalibrationCache.open(cache_dir, expect_graph=graph_fingerprint(fp32_path))
        have = {k: cache.meta["source"].get(k) for k in ("calib", "input_fingerprint")}
        want = spec_source(spec)
        if explicit and any(have[k] != want.get(k) for k in have):
            what = "" if have["calib"] != want["calib"] else " (the same file name with other contents)"
            raise UserError(f"--calib-cache {cache_dir}: recorded from {have['calib']}{what}, but --calib asks for "
                            f"{want['calib']}; use a new cache folder, or drop --calib to reuse this one")
        return cache, time.perf_counter() - t0, True
    cache = calibrate(spec, adapter, fp32_path, graph, cache_dir, **kwargs)
    return cache, time.perf_counter() - t0, False
