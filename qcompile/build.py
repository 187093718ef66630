"""One build: export -> canonicalize -> calibrate -> quantize per bucket -> emit -> validate -> report.

Everything is written into a staging folder that replaces `--out` only when the build finishes, so a
failed or interrupted build leaves nothing that looks complete and loses nothing the user had.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from qcompile.artifact import (
    MANIFEST,
    MANIFEST_FORMAT,
    tool_versions,
)
from qcompile.atomic import StagedFolder, write_json
from qcompile.calibration.buckets import choose_buckets
from qcompile.calibration.cache import CalibrationCache
from qcompile.calibration.calibrate import default_calib, open_or_calibrate, user_inputs
from qcompile.calibration.estimators import estimate_ranges
from qcompile.calibration.inputs import InputSet, unbatched_inputs
from qcompile.calibration.pipeline_recorder import read_prompts, record_pipeline, split_prompts
from qcompile.calibration.smoothing import Smoothed, smooth
from qcompile.config import CalibKind, CalibSpec, CompileConfig
from qcompile.errors import UserError
from qcompile.evaluation.evaluate import HELD_OUT_SEED_OFFSET, evaluate_artifact, held_out_inputs
from qcompile.evaluation.report import format_table
from qcompile.graph_io import load_graph, save_graph
from qcompile.pass_manager import PassContext, PassManager
from qcompile.passes.canonicalize import canonicalize_passes
from qcompile.passes.insert_qdq import plan_quantization
from qcompile.passes.split_shortcut_concat import SplitShortcutConcat
from qcompile.sensitivity import MixedPrecision, exact, mixed_precision
from qcompile.target import load_target

log = logging.getLogger("qcompile.build")
FP32_DIR = "fp32"


@dataclass(frozen=True)
class BuildResult:
    out_dir: Path
    report: dict[str, Any]
    manifest: dict[str, Any]

    @property
    def passed(self) -> bool:
        return bool(self.report["passed"])


def _stage(msg: str) -> float:
    log.info(msg)
    print(f"[qcompile] {msg}", flush=True)
    return time.perf_counter()


def resolve(cfg: CompileConfig):
    from qcompile.models.source import resolve_model

    return resolve_model(cfg.model, cfg.component, seed=cfg.seed)


def export_canonical(adapter, folder: Path, *, opset: int, ctx: PassContext,
                     split_shortcut: bool = False) -> tuple[Path, Any]:
    """Export the float model and canonicalize it; returns the canonical model path and the export record.

    `split_shortcut` applies Q-Diffusion's shortcut split to the float graph (numerically the same), so
    calibration sees, and each bucket quantizes, the two halves of every skip Concat separately."""
    from qcompile.export import export_onnx

    scratch = folder / ".export"
    raw = export_onnx(adapter, scratch / "exported.onnx", opset=opset)
    graph = load_graph(raw.onnx_path)
    PassManager(canonicalize_passes(), fixed_point=True).run(graph, ctx)
    if split_shortcut:
        PassManager([SplitShortcutConcat(), *canonicalize_passes()]).run(graph, ctx)
    path = save_graph(graph, folder / "model.onnx")
    shutil.rmtree(scratch)
    return path, raw


def reuse_export(source: Path, folder: Path) -> tuple[Path, Any]:
    """Copy the canonical float model of an earlier `qcompile export` or build folder: rebuilding for
    another target, estimator or bucket count from a calibration cache then runs no model at all."""
    from qcompile.artifact import read_manifest
    from qcompile.export import ExportResult

    m = read_manifest(source)
    rel = m.get("source", {}).get("fp32_model") or (m.get("files") or [None])[0]
    model = Path(source) / rel if rel else None
    if model is None or not model.is_file():
        raise UserError(f"--from-export {source}: no canonical float model listed in its manifest")
    folder.mkdir(parents=True, exist_ok=True)
    for p in (model, model.with_name(model.name + ".data")):
        shutil.copy2(p, folder / p.name.replace(model.stem, "model", 1))
    e = m["export"]
    return folder / "model.onnx", ExportResult(folder / "model.onnx", e["exporter"], e["opset"],
                                               e["max_abs_diff_vs_torch"], 0.0, tuple(e.get("notes", ())))


def input_roles(adapter) -> tuple[str | None, str | None]:
    """Names of the sample and timestep inputs (None when the model has none)."""
    from qcompile.models.base import InputRole, NoiseSchedule

    specs = adapter.input_specs()
    sample = next((s.name for s in specs if s.role is InputRole.SAMPLE), None)
    timestep = next((s.name for s in specs if s.role is InputRole.TIMESTEP), None)
    if adapter.noise_schedule is NoiseSchedule.NONE:
        timestep = None
    return sample, timestep


def calibration_plan(cfg: CompileConfig, adapter) -> tuple[CalibSpec, InputSet | None, InputSet]:
    """(spec, inputs to record or None to let the spec decide, held-back validation inputs).

    A user's .npz with four or more samples gives its last quarter to validation; validation inputs
    are never used for calibration.
    """
    spec = cfg.calib or default_calib(adapter)
    if spec.kind is CalibKind.PROMPTS:
        if pipeline_of(cfg) is None:
            raise UserError(f"--calib {spec.describe()}: needs a diffusers pipeline folder as MODEL, with --component")
        return spec, None, prompts_held_out(cfg, spec, adapter)
    held_out = held_out_inputs(adapter, cfg.validate_count, cfg.seed)
    if spec.kind is not CalibKind.FILE:
        return spec, None, held_out
    data = user_inputs(spec, adapter, input_roles(adapter)[1])
    if data.count >= 4:
        calib, held_out = data.split(data.count - max(1, data.count // 4))
        return spec, calib, held_out
    return spec, data, held_out


def prompts_held_out(cfg: CompileConfig, spec: CalibSpec, adapter) -> InputSet:
    """Validation inputs for a pipeline source: the pipeline's own calls on the held-back prompts (the
    component sees the real text encoder's outputs, which synthetic inputs do not resemble); synthetic
    inputs when the file has fewer than four prompts."""
    _, held = split_prompts(read_prompts(spec.path))
    if not held:
        return held_out_inputs(adapter, cfg.validate_count, cfg.seed)
    folder, component = pipeline_of(cfg)
    sampler = cfg.fidelity.sampler
    with tempfile.TemporaryDirectory(prefix="qcompile-heldout-") as tmp:
        rec = record_pipeline(folder, component, held, adapter, Path(tmp), steps=sampler.steps,
                              guidance=sampler.guidance, seed=cfg.seed + HELD_OUT_SEED_OFFSET,
                              unbatched=unbatched_inputs(adapter), source={"held_out": len(held)})
        return rec.spread_rows(cfg.validate_count)


def pipeline_of(cfg: CompileConfig) -> tuple[Path, str] | None:
    """(pipeline folder, component) when MODEL is a pipeline folder: what `--calib prompts:FILE` runs."""
    return (Path(cfg.model), cfg.component) if cfg.component else None


def exclusions(cfg: CompileConfig, adapter, caps) -> tuple[str, ...]:
    if caps.integer_only:  # an NPU target: nothing may stay float on the device
        if cfg.exclude or cfg.mixed_precision_sqnr_db is not None or cfg.max_float_layers is not None:
            raise UserError(f"--target {cfg.target.value}: runs integer graphs only; --exclude and mixed "
                            "precision would need float layers")
        return ()
    if cfg.full_integer:
        if cfg.exclude:
            raise UserError("--full-integer and --exclude contradict each other: choose one")
        return ()
    return (*adapter.default_float_scopes(), *cfg.exclude)


def build(cfg: CompileConfig) -> BuildResult:
    t_start = time.perf_counter()
    # an unknown target fails before any work
    target = load_target(cfg.target, static_batch=cfg.static_batch, htp_arch=cfg.htp_arch)
    adapter = resolve(cfg)
    spec, calib_inputs, held_out = calibration_plan(cfg, adapter)
    excluded = exclusions(cfg, adapter, target.caps)
    with StagedFolder(cfg.out_dir) as stage, tempfile.TemporaryDirectory(prefix="qcompile-calib-") as tmp:
        work = stage.path
        ctx = PassContext()
        if cfg.export_from is not None:
            _stage(f"reusing the float model of {cfg.export_from}")
            fp32_path, exported = reuse_export(cfg.export_from, work / FP32_DIR)
        else:
            _stage(f"exporting {type(adapter.module).__name__} ({adapter.family.value}) to ONNX")
            fp32_path, exported = export_canonical(adapter, work / FP32_DIR, opset=cfg.opset, ctx=ctx,
                                                   split_shortcut=cfg.split_shortcut)
        names = input_roles(adapter)
        graph = load_graph(fp32_path)
        plan = plan_quantization(graph, target.caps, excluded)

        _stage(f"calibrating ({spec.describe()})" + (f", cache {cfg.calib_cache}" if cfg.calib_cache else ""))
        cache, t_calib, reused = open_or_calibrate(spec, adapter, fp32_path, graph, cfg.calib_cache or Path(tmp),
                                                   names=names, sampler=cfg.fidelity.sampler, seed=cfg.seed,
                                                   inputs=calib_inputs, pipeline=pipeline_of(cfg))
        if reused:
            print(f"[qcompile] reused calibration cache {cfg.calib_cache} ({t_calib:.2f}s, no model run)")
        table = cache.table()
        levels = target.caps.activation_dtype.qmax - target.caps.activation_dtype.qmin
        mixed = None
        if cfg.mixed_precision_sqnr_db is not None or cfg.max_float_layers is not None:
            mixed = _mixed_precision(cfg, target, fp32_path, table, cache, excluded, levels)
            excluded = (*excluded, *exact(mixed.float_layers))
            graph = load_graph(fp32_path)
            plan = plan_quantization(graph, target.caps, excluded)
        quant_src, smoothed = fp32_path, None
        if cfg.smoothquant_alpha is not None:
            _stage(f"smoothing MatMul/Gemm inputs (SmoothQuant, alpha {cfg.smoothquant_alpha}), statistics again")
            smoothed = smooth(fp32_path, [w.node for w in plan.weights], table, cache.recording(),
                              cfg.smoothquant_alpha, Path(tmp),
                              lambda g: plan_quantization(g, target.caps, excluded).activations)
            quant_src, table = smoothed.path, smoothed.table
            graph = load_graph(quant_src)
            plan = plan_quantization(graph, target.caps, excluded)
            print(f"[qcompile] smoothquant: {len(smoothed.groups)} group(s), "
                  f"{sum(len(g.nodes) for g in smoothed.groups)} layer(s) ({smoothed.seconds:.1f}s)", flush=True)
        buckets = choose_buckets(table, cfg.buckets, cfg.bucket_method, timestep_scale=adapter.timestep_scale)

        _stage(f"quantizing for {target.name.value}: {len(buckets)} bucket(s), estimator {cfg.estimator.value}")
        graphs = []
        for bucket in buckets:
            g = graph if bucket.index == len(buckets) - 1 else load_graph(quant_src)
            ranges = estimate_ranges(table, cfg.estimator, bucket.timestep_indices, names=plan.activations,
                                     levels=levels, symmetric=target.caps.activation_symmetric)
            PassManager(target.pipeline(plan, ranges, timestep_input=names[1])).run(g, ctx)
            graphs.append(g)
        files = target.emit(graphs, work)
        manifest = _manifest(cfg, spec, adapter, target, exported, fp32_path, cache, plan, ctx,
                             _bucket_entries(buckets, table, files), names, excluded, mixed, smoothed)
        write_json(work / MANIFEST, manifest)

        _stage("evaluating the artifact against the float model")
        extra = {"calibration_seconds": round(t_calib, 3), "calibration_reused": reused,
                 "float_layers": len(plan.excluded), "build_seconds": round(time.perf_counter() - t_start, 3)}
        if mixed is not None:
            extra.update({"mixed_precision_float_layers": len(mixed.float_layers),
                          "mixed_precision_probe_sqnr_db": round(mixed.sqnr_db, 3),
                          "all_quantized_probe_sqnr_db": round(mixed.all_quantized_sqnr_db, 3)})
        report = evaluate_artifact(work, adapter, held_out=held_out, thresholds=cfg.thresholds, fidelity=cfg.fidelity,
                                   extra=extra,
                                   sensitivity=None if mixed is None else [s.as_dict() for s in mixed.ranking[:20]])
        out = stage.commit()
    print(format_table(report), flush=True)
    return BuildResult(out, report, manifest)


def _mixed_precision(cfg: CompileConfig, target, fp32_path: Path, table, cache: CalibrationCache,
                     excluded: tuple[str, ...], levels: int) -> MixedPrecision:
    probe = cache.recording().spread_rows(64)
    ranges = estimate_ranges(table, cfg.estimator, levels=levels, symmetric=target.caps.activation_symmetric)
    budget = cfg.max_float_layers if cfg.max_float_layers is not None else 10**6
    _stage(f"measuring layer sensitivity on {probe.count} recorded inputs")
    mixed = mixed_precision(fp32_path, target, ranges, probe, excluded, target_sqnr_db=cfg.mixed_precision_sqnr_db,
                            max_float=budget)
    print(f"[qcompile] mixed precision: {len(mixed.float_layers)} float layer(s), probe SQNR "
          f"{mixed.all_quantized_sqnr_db:.2f} -> {mixed.sqnr_db:.2f} dB", flush=True)
    return mixed


def _bucket_entries(buckets, table, files: list[list[str]]) -> list[dict[str, Any]]:
    return [{"index": b.index, "timestep_range": list(b.timestep_range),
             "calibration_timesteps": [float(table.timesteps[i]) for i in sorted(b.timestep_indices)
                                       if not np.isnan(table.timesteps[i])],
             "files": f} for b, f in zip(buckets, files, strict=True)]


def _precision(target) -> str:
    caps = target.caps
    if not caps.weighted_ops and not caps.int8_ops:
        return "fp32"  # a float baseline of a quantizing emitter (tflite-fp32)
    return f"w{caps.weight_dtype.bits}a{caps.activation_dtype.bits}"


def _manifest(cfg, spec: CalibSpec, adapter, target, exported, fp32_path: Path, cache: CalibrationCache, plan,
              ctx: PassContext, buckets: list[dict[str, Any]], names: tuple[str | None, str | None],
              excluded: tuple[str, ...], mixed: MixedPrecision | None, smoothed: Smoothed | None) -> dict[str, Any]:
    sample_name, timestep_name = names
    return {
        "format": MANIFEST_FORMAT,
        "qcompile_version": tool_versions()["qcompile"],
        "target": target.name.value,
        "precision": _precision(target),
        "source": {
            "model": cfg.model,
            "component": cfg.component,
            "seed": cfg.seed,
            "family": adapter.family.value,
            "class": type(adapter.module).__name__,
            "fp32_model": f"{FP32_DIR}/{fp32_path.name}",
            "fingerprint": cache.graph_fingerprint,
        },
        "model": {
            "inputs": [{"name": s.name, "shape": list(s.shape), "dtype": s.dtype, "role": s.role.value}
                       for s in adapter.input_specs()],
            "outputs": list(adapter.output_names),
            "sample_input": sample_name,
            "timestep_input": timestep_name,
            "timestep_scale": float(adapter.timestep_scale),
        },
        "export": {"exporter": exported.exporter, "opset": exported.opset,
                   "max_abs_diff_vs_torch": exported.max_abs_diff, "notes": list(exported.notes)},
        "calibration": {
            "spec": spec.describe(),
            "rows": cache.meta["samples"]["rows"],
            "calls": cache.meta["samples"]["calls"],
            "estimator": cfg.estimator.value,
            "bucket_method": cfg.bucket_method.value,
            "cache_fingerprint": cache.fingerprint,
            "recording_fingerprint": cache.meta["fingerprints"]["recording"],
            "timesteps": [t for t in cache.meta["timesteps"] if t is not None] or None,
        },
        "quantization": {
            "weights": target.caps.weight_dtype.value + " symmetric per-channel",
            "activations": target.caps.activation_dtype.value
            + (" symmetric" if target.caps.activation_symmetric else " asymmetric") + " per-tensor",
            "outputs": (target.caps.output_dtype or target.caps.activation_dtype).value,
            "quantized_activations": len(plan.activations),
            "quantized_weights": len(plan.weights),
            "float_layers": list(plan.excluded),
            "exclusion_patterns": list(excluded),
            "full_integer": cfg.full_integer,
            "split_shortcut": cfg.split_shortcut,
            "smoothquant": None if smoothed is None else smoothed.summary(),
            "mixed_precision": None if mixed is None else {
                "target_sqnr_db": mixed.target_sqnr_db, "reached_sqnr_db": round(mixed.sqnr_db, 3),
                "all_quantized_sqnr_db": round(mixed.all_quantized_sqnr_db, 3),
                "float_layers": list(mixed.float_layers),
                "sensitivity_top20": [s.as_dict() for s in mixed.ranking[:20]]},
        },
        "buckets": buckets,
        # Files a target writes for other toolchains (QNN: float graph + encodings), not run by its runner.
        "sdk_files": target.sdk_files() if hasattr(target, "sdk_files") else [],
        # What the device files were made for (QNN: the HTP architecture of the context binaries).
        "device": target.device_record() if hasattr(target, "device_record") else {},
        "pass_log": [e.as_dict() for e in ctx.log],
        "tools": tool_versions(),
    }


def write_calibration_cache(model: str, component: str | None, *, seed: int, opset: int, spec: CalibSpec | None,
                            cache_dir: Path, sampler, export_from: Path | None = None) -> CalibrationCache:
    """`qcompile calibrate`: record and compute statistics once; any number of builds reuse them."""
    if CalibrationCache.exists(cache_dir):
        raise UserError(f"--calib-cache {cache_dir}: already holds a calibration cache; choose a new folder")
    cfg = CompileConfig(model=model, component=component, out_dir=Path(cache_dir), seed=seed, opset=opset)
    adapter = resolve(cfg)
    spec, inputs, _ = calibration_plan(replace(cfg, calib=spec), adapter)
    with tempfile.TemporaryDirectory(prefix="qcompile-export-") as tmp:
        if export_from is not None:
            fp32_path, _ = reuse_export(export_from, Path(tmp))
        else:
            _stage(f"exporting {type(adapter.module).__name__} ({adapter.family.value}) to ONNX")
            fp32_path, _ = export_canonical(adapter, Path(tmp), opset=opset, ctx=PassContext())
        _stage(f"calibrating ({spec.describe()}) into {cache_dir}")
        cache, seconds, _ = open_or_calibrate(spec, adapter, fp32_path, load_graph(fp32_path), Path(cache_dir),
                                              names=input_roles(adapter), sampler=sampler, seed=seed, inputs=inputs,
                                              pipeline=pipeline_of(cfg))
    print(f"[qcompile] calibration took {seconds:.2f}s")
    return cache


def export_only(cfg: CompileConfig) -> Path:
    """`qcompile export`: the canonical float ONNX alone, verified against torch."""
    adapter = resolve(cfg)
    with StagedFolder(cfg.out_dir) as stage:
        ctx = PassContext()
        fp32_path, exported = export_canonical(adapter, stage.path, opset=cfg.opset, ctx=ctx)
        write_json(stage.path / MANIFEST, {
            "format": MANIFEST_FORMAT, "target": "fp32-onnx", "qcompile_version": tool_versions()["qcompile"],
            "source": {"model": cfg.model, "component": cfg.component, "family": adapter.family.value,
                       "class": type(adapter.module).__name__},
            "export": {"exporter": exported.exporter, "opset": exported.opset,
                       "max_abs_diff_vs_torch": exported.max_abs_diff, "notes": list(exported.notes)},
            "files": [fp32_path.name, fp32_path.name + ".data"],
            "pass_log": [e.as_dict() for e in ctx.log], "tools": tool_versions(),
        })
        out = stage.commit()
    print(f"[qcompile] exported {out / fp32_path.name} ({exported.exporter}, opset {exported.opset}, "
          f"max abs diff vs torch {exported.max_abs_diff:.2e})")
    return out


