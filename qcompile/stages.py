"""One build, as stages: export -> calibrate -> decide -> quantize per bucket -> emit -> evaluate.

Each stage is a function taking the previous stages' results (frozen records) and returning its own;
the canonical float graph is loaded once, and every bucket compiles a copy of it. Everything is
written into a staging folder that replaces `--out` only when the build succeeds, so a failed or
interrupted build leaves nothing that looks complete and loses nothing the user had.
"""

from __future__ import annotations

import gc
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from qcompile.artifact import tool_versions, write_model_config
from qcompile.atomic import StagedFolder
from qcompile.bias_correction import Corrected, correct_bucket
from qcompile.bucket_precision import (
    BucketMixed,
    BucketTargets,
    ProbeRows,
    bucket_mixed_precision,
    bucket_probe_rows,
    wide_fractions,
)
from qcompile.calibration.buckets import Bucket, choose_buckets
from qcompile.calibration.cache import CalibrationCache
from qcompile.calibration.calibrate import default_calib, open_or_calibrate, user_inputs
from qcompile.calibration.estimators import estimate_ranges
from qcompile.calibration.inputs import InputSet, unbatched_inputs
from qcompile.calibration.pipeline_recorder import read_prompts, record_pipeline, split_prompts
from qcompile.calibration.shards import Shard
from qcompile.calibration.smoothing import Smoothed, smooth
from qcompile.calibration.stats import StatsTable
from qcompile.caps import PrecisionFallback
from qcompile.config import CalibKind, CalibSpec, CompileConfig
from qcompile.errors import UserError
from qcompile.evaluation.evaluate import HELD_OUT_SEED_OFFSET, evaluate_artifact, held_out_inputs
from qcompile.evaluation.report import format_table
from qcompile.export_child import ModelSource, exports_in_child
from qcompile.graph_io import copy_graph, load_graph, save_graph
from qcompile.manifest import (
    FP32_TARGET,
    BucketRecord,
    CalibrationRecord,
    ExportRecord,
    InputRecord,
    Manifest,
    ModelRecord,
    QuantizationRecord,
    SourceRecord,
)
from qcompile.pass_manager import PassContext, PassManager, graph_properties
from qcompile.passes.canonicalize import canonicalize_passes
from qcompile.passes.insert_qdq import QuantPlan, plan_quantization
from qcompile.passes.split_shortcut_concat import SplitShortcutConcat
from qcompile.ray_tasks import require_ray
from qcompile.sensitivity import MixedPrecision, ProbeMap, exact, mixed_precision, probe_each
from qcompile.sensitivity_ray import ray_probe_map
from qcompile.static_inputs import PinnedShapes, accepted_shapes, pin_graph, pin_shapes
from qcompile.target import BucketJob, CompiledBucket, EmitResult, Target, load_target

log = logging.getLogger("qcompile.stages")
FP32_DIR = "fp32"
PROBE_ROWS = 64  # recorded rows each mixed-precision probe runs (per bucket with --mixed-precision-per-bucket)


@dataclass(frozen=True)
class BuildResult:
    out_dir: Path
    report: dict[str, Any]
    manifest: Manifest

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


# --- stage records ------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Exported:
    """The canonical float model: its file (inside the artifact), the export record, the graph."""

    path: Path
    record: ExportRecord
    graph: gs.Graph


@dataclass(frozen=True, eq=False)
class Calibrated:
    spec: str  # what the statistics were computed from: the cache's own record when it is reused
    cache: CalibrationCache
    table: StatsTable
    seconds: float
    reused: bool


@dataclass(frozen=True, eq=False)
class Decisions:
    """What each bucket quantizes, and from which float graph (the smoothed one with SmoothQuant)."""

    graph: gs.Graph
    plan: QuantPlan
    table: StatsTable
    buckets: tuple[Bucket, ...]
    exclusions: tuple[str, ...]  # module-path / node-name patterns taken out of the main precision
    mixed: MixedPrecision | None
    smoothed: Smoothed | None
    # Mixed precision per bucket: what each bucket raised, and each bucket's plan (empty: `plan` for all)
    bucket_mixed: tuple[BucketMixed, ...] = ()
    bucket_plans: tuple[QuantPlan, ...] = ()

    def plan_of(self, bucket: int) -> QuantPlan:
        return self.bucket_plans[bucket] if self.bucket_plans else self.plan


@dataclass(frozen=True)
class InputNames:
    sample: str | None
    timestep: str | None


# --- stage 1: export ----------------------------------------------------------------------------
def export_canonical(adapter, folder: Path, *, opset: int, ctx: PassContext,
                     split_shortcut: bool = False, source: ModelSource | None = None) -> Exported:
    """Export the float model and canonicalize it (a large model exports in a child process loading
    it from `source`: see `qcompile.export_child`).

    `split_shortcut` applies Q-Diffusion's shortcut split to the float graph (numerically the same), so
    calibration sees, and each bucket quantizes, the two halves of every skip Concat separately."""
    from qcompile.export import export_onnx

    scratch = folder / ".export"
    if exports_in_child(adapter, source):
        release_torch_weights(adapter)  # the child loads its own copy; this one is never read again
    raw = export_onnx(adapter, scratch / "exported.onnx", opset=opset, source=source)
    graph = load_graph(raw.onnx_path)
    PassManager(canonicalize_passes(), fixed_point=True, name="canonicalize").run(graph, ctx)
    if split_shortcut:
        PassManager([SplitShortcutConcat(), *canonicalize_passes()], name="split-shortcut").run(graph, ctx)
    path = save_graph(graph, folder / "model.onnx")
    shutil.rmtree(scratch)
    saved = load_graph(path)  # its weights now read from the saved file, not the deleted scratch export
    graph_properties(saved).update(graph_properties(graph))
    record = ExportRecord(raw.exporter, raw.opset, raw.max_abs_diff, tuple(raw.notes))
    return Exported(path, record, saved)


def reuse_export(source: Path, folder: Path) -> Exported:
    """Copy the canonical float model of an earlier `qcompile export` or build folder: rebuilding for
    another target, estimator or bucket count from a calibration cache then runs no model at all."""
    m = Manifest.read(source)
    model = m.fp32_path(source)
    if not model.is_file():
        raise UserError(f"--from-export {source}: its manifest lists {m.source.fp32_model}, which is missing")
    folder.mkdir(parents=True, exist_ok=True)
    for p in (model, model.with_name(model.name + ".data")):
        shutil.copy2(p, folder / p.name.replace(model.stem, "model", 1))
    path = folder / "model.onnx"
    return Exported(path, m.export, load_graph(path))


def release_torch_weights(adapter) -> None:
    """From here on the float model is the exported ONNX file: every later stage runs onnxruntime, so
    torch's copy of the weights (a whole fp32 copy, 3.4 GB for SD 1.5) is dropped. The module keeps
    its class and config (the manifest names them); its parameters move to the meta device."""
    adapter.module.to("meta")
    gc.collect()


def export_stage(cfg: CompileConfig, adapter, folder: Path, ctx: PassContext) -> Exported:
    if cfg.export_from is not None:
        _stage(f"reusing the float model of {cfg.export_from}")
        return reuse_export(cfg.export_from, folder)
    _stage(f"exporting {type(adapter.module).__name__} ({adapter.family.value}) to ONNX")
    return export_canonical(adapter, folder, opset=cfg.opset, ctx=ctx, split_shortcut=cfg.split_shortcut,
                            source=model_source(cfg))


def model_source(cfg: CompileConfig) -> ModelSource:
    """Where a child process loads the model the build resolved."""
    return ModelSource(cfg.model, cfg.component, cfg.seed)


# --- stage 2: calibrate -------------------------------------------------------------------------
def input_names(adapter) -> InputNames:
    """Names of the sample and timestep inputs (None when the model has none)."""
    from qcompile.models.base import InputRole, NoiseSchedule

    specs = adapter.input_specs()
    sample = next((s.name for s in specs if s.role is InputRole.SAMPLE), None)
    timestep = next((s.name for s in specs if s.role is InputRole.TIMESTEP), None)
    if adapter.noise_schedule is NoiseSchedule.NONE:
        timestep = None
    return InputNames(sample, timestep)


@dataclass(frozen=True, eq=False)
class CalibrationPlan:
    spec: CalibSpec
    inputs: InputSet | None  # rows to record (a user's file minus its held-out quarter); None: the spec decides
    held_out: InputSet  # validation inputs, never calibrated on


def calibration_plan(cfg: CompileConfig, adapter) -> CalibrationPlan:
    """A user's .npz with four or more samples gives its last quarter to validation; validation inputs
    are never used for calibration."""
    spec = cfg.calib or default_calib(adapter)
    if spec.kind is CalibKind.PROMPTS:
        if pipeline_of(cfg) is None:
            raise UserError(f"--calib {spec.describe()}: needs a diffusers pipeline folder as MODEL, with --component")
        return CalibrationPlan(spec, None, prompts_held_out(cfg, spec, adapter))
    held_out = held_out_inputs(adapter, cfg.validate_count, cfg.seed)
    if spec.kind is not CalibKind.FILE:
        return CalibrationPlan(spec, None, held_out)
    data = user_inputs(spec, adapter, input_names(adapter).timestep)
    if data.count >= 4:
        calib, held = data.split(data.count - max(1, data.count // 4))
        return CalibrationPlan(spec, calib, held)
    return CalibrationPlan(spec, data, held_out)


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


def calibrate_stage(cfg: CompileConfig, adapter, exported: Exported, plan: CalibrationPlan,
                    cache_dir: Path) -> Calibrated:
    _stage(f"calibrating ({plan.spec.describe()})" + (f", cache {cfg.calib_cache}" if cfg.calib_cache else ""))
    names = input_names(adapter)
    cache, seconds, reused = open_or_calibrate(plan.spec, adapter, exported.path, exported.graph, cache_dir,
                                               explicit=cfg.calib is not None, names=(names.sample, names.timestep),
                                               sampler=cfg.fidelity.sampler, seed=cfg.seed, inputs=plan.inputs,
                                               pipeline=pipeline_of(cfg))
    if reused:
        print(f"[qcompile] reused calibration cache {cfg.calib_cache} ({seconds:.2f}s, no model run)")
    return Calibrated(str(cache.meta["source"].get("calib") or plan.spec.describe()), cache, cache.table(), seconds,
                      reused)


# --- stage 3: decide ----------------------------------------------------------------------------
def exclusions(cfg: CompileConfig, adapter, target: Target) -> tuple[str, ...]:
    """Patterns of the layers the user and the model family keep out of the target's main precision."""
    caps = target.caps
    mixed = (cfg.mixed_precision_sqnr_db is not None or cfg.max_float_layers is not None
             or cfg.mixed_precision_per_bucket)
    if mixed and caps.fallback is PrecisionFallback.NONE:
        raise UserError(f"--mixed-precision: target {target.name.value} has no precision to fall back to "
                        f"(activations are {caps.activation_dtype.value} everywhere)")
    if cfg.bias_correction and caps.explicit is not None:
        raise UserError(f"--bias-correction: target {target.name.value} is not supported (TensorRT fuses and "
                        "requantizes its own way; the correction could not be measured on its runtime here)")
    if caps.integer_only:  # an NPU target: nothing may stay float on the device
        if cfg.exclude:
            raise UserError(f"--exclude: target {target.name.value} runs integer graphs only; no layer can stay float")
        return ()
    if cfg.full_integer:
        if cfg.exclude:
            raise UserError("--full-integer and --exclude contradict each other: choose one")
        return ()
    return (*adapter.default_float_scopes(), *cfg.exclude)


def decide_stage(cfg: CompileConfig, target: Target, adapter, exported: Exported, calibrated: Calibrated,
                 scratch: Path, pinned: PinnedShapes | None = None) -> Decisions:
    """Which layers stay out of the main precision (family defaults, --exclude, mixed precision), the
    SmoothQuant rewrite, and the timestep buckets."""
    caps = target.caps
    excluded = exclusions(cfg, adapter, target)
    table, graph = calibrated.table, exported.graph
    mixed = None
    per_bucket = cfg.mixed_precision_per_bucket
    if not per_bucket and (cfg.mixed_precision_sqnr_db is not None or cfg.max_float_layers is not None):
        mixed = _mixed_precision(cfg, target, adapter, exported, calibrated, excluded, input_names(adapter), scratch,
                                 pinned)
        excluded = (*excluded, *exact(mixed.float_layers))
    smoothed = None
    if cfg.smoothquant_alpha is not None:
        _stage(f"smoothing MatMul/Gemm inputs (SmoothQuant, alpha {cfg.smoothquant_alpha}), statistics again")
        plan = plan_quantization(graph, caps, excluded)
        smoothed = smooth(exported.path, [w.node for w in plan.weights], table, calibrated.cache.recording(),
                          cfg.smoothquant_alpha, scratch, lambda g: plan_quantization(g, caps, excluded).activations)
        table, graph = smoothed.table, load_graph(smoothed.path)
        print(f"[qcompile] smoothquant: {len(smoothed.groups)} group(s), "
              f"{sum(len(g.nodes) for g in smoothed.groups)} layer(s) ({smoothed.seconds:.1f}s)", flush=True)
    plan = plan_quantization(graph, caps, excluded)
    _check_statistics(plan, table, calibrated.cache.folder)
    buckets = choose_buckets(table, cfg.buckets, cfg.bucket_method, timestep_scale=adapter.timestep_scale)
    if len(buckets) != cfg.buckets:  # never silently: the manifest and report record what was asked
        timesteps = table.timesteps
        why = ("the model has no timestep input" if np.isnan(timesteps).all()
               else f"the calibration holds {len(timesteps)} distinct timestep(s)")
        print(f"[qcompile] warning: --buckets {cfg.buckets}: {len(buckets)} bucket(s) built, {why}", flush=True)
    bucket_mixed: tuple[BucketMixed, ...] = ()
    plans: tuple[QuantPlan, ...] = ()
    if per_bucket:
        bucket_mixed = _bucket_mixed_precision(cfg, target, adapter, exported, calibrated, excluded, buckets, scratch,
                                               pinned)
        plans = tuple(plan_quantization(graph, caps, (*excluded, *exact(m.wide_layers))) for m in bucket_mixed)
    return Decisions(graph, plan, table, tuple(buckets), excluded, mixed, smoothed, bucket_mixed, plans)


def _check_statistics(plan: QuantPlan, table: StatsTable, cache_dir: Path) -> None:
    """Every activation the plan quantizes needs statistics: without them it would silently stay float
    while the manifest counts it quantized."""
    fixed = {name for name, _, _ in plan.fixed}
    missing = [n for n in plan.activations
               if n not in fixed and (n not in table.tensors or int(table.tensors[n].count.sum()) == 0)]
    if missing:
        raise UserError(f"--calib-cache {cache_dir}: no statistics for {len(missing)} tensor(s) this graph quantizes, "
                        f"e.g. '{missing[0]}'; the cache is incomplete: recalibrate into a new folder")


def _mixed_precision(cfg: CompileConfig, target: Target, adapter, exported: Exported, calibrated: Calibrated,
                     excluded: tuple[str, ...], names: InputNames, scratch: Path,
                     pinned: PinnedShapes | None) -> MixedPrecision:
    probe = calibrated.cache.recording().spread_rows(64)
    caps = target.caps
    levels = caps.activation_dtype.qmax - caps.activation_dtype.qmin
    ranges = estimate_ranges(calibrated.table, cfg.estimator, levels=levels, symmetric=caps.activation_symmetric)
    budget = cfg.max_float_layers if cfg.max_float_layers is not None else 10**6
    kept = "float" if caps.fallback is PrecisionFallback.FLOAT else f"at {caps.wide_dtype.value} activations"
    _stage(f"measuring layer sensitivity on {probe.count} recorded inputs (layers taken out run {kept})")
    template = Manifest(target=target.name.value, precision=precision_of(target),
                        qcompile_version=tool_versions()["qcompile"],
                        source=source_record(cfg, adapter, exported.path.name, None), model=model_record(adapter),
                        export=exported.record)
    graph = exported.graph if pinned is None else pin_graph(copy_graph(exported.graph), pinned)
    mixed = mixed_precision(graph, exported.path, target, ranges, probe, excluded,
                            timestep_input=names.timestep, template=template, folder=scratch / "sensitivity",
                            target_sqnr_db=cfg.mixed_precision_sqnr_db, max_float=budget,
                            probe_map=_probe_map(cfg))
    print(f"[qcompile] mixed precision: {len(mixed.float_layers)} layer(s) {kept}, probe SQNR "
          f"{mixed.all_quantized_sqnr_db:.2f} -> {mixed.sqnr_db:.2f} dB", flush=True)
    return mixed


def _probe_map(cfg: CompileConfig) -> ProbeMap:
    """How the ranking's per-layer probes run: here, one after the other, or as Ray tasks (`--ray`)."""
    return probe_each if cfg.ray is None else ray_probe_map(cfg.ray)


def _bucket_mixed_precision(cfg: CompileConfig, target: Target, adapter, exported: Exported, calibrated: Calibrated,
                            excluded: tuple[str, ...], buckets: list[Bucket], scratch: Path,
                            pinned: PinnedShapes | None) -> tuple[BucketMixed, ...]:
    """Per bucket, its own sensitivity on its own recorded rows and ranges, and its fewest raised layers."""
    caps, table = target.caps, calibrated.table
    levels = caps.activation_dtype.qmax - caps.activation_dtype.qmin
    kept = "float" if caps.fallback is PrecisionFallback.FLOAT else f"at {caps.wide_dtype.value} activations"
    targets = BucketTargets(cfg.mixed_precision_sqnr_db, cfg.mixed_precision_cfg_gap)
    budget = cfg.max_float_layers if cfg.max_float_layers is not None else 10**6
    names = input_names(adapter)
    template = Manifest(target=target.name.value, precision=precision_of(target),
                        qcompile_version=tool_versions()["qcompile"],
                        source=source_record(cfg, adapter, exported.path.name, None), model=model_record(adapter),
                        export=exported.record)
    graph = exported.graph if pinned is None else pin_graph(copy_graph(exported.graph), pinned)
    recording = calibrated.cache.recording()
    out = []
    for b in buckets:
        ts = [float(table.timesteps[i]) for i in b.timestep_indices if not np.isnan(table.timesteps[i])]
        rows = (bucket_probe_rows(recording, ts, PROBE_ROWS) if ts
                else ProbeRows(recording.spread_rows(PROBE_ROWS), np.zeros((0, 2), np.int64), np.zeros(0)))
        if cfg.mixed_precision_cfg_gap is not None and not len(rows.pairs):
            raise UserError(f"--mixed-precision-cfg-gap {cfg.mixed_precision_cfg_gap}: the calibration rows of bucket "
                            f"{b.index} hold no classifier-free guidance pairs (cond and uncond halves of one "
                            "call); record the model's own sampling with guidance (--calib sample:N)")
        ranges = estimate_ranges(table, cfg.estimator, b.timestep_indices, levels=levels,
                                 symmetric=caps.activation_symmetric)
        _stage(f"bucket {b.index} (t in [{b.timestep_range[0]:g}, {b.timestep_range[1]:g})): sensitivity on "
               f"{rows.inputs.count} recorded rows (layers taken out run {kept})")
        m = bucket_mixed_precision(graph, exported.path, target, ranges, rows, excluded,
                                   bucket=b.index, timestep_input=names.timestep, template=template,
                                   folder=scratch / f"sensitivity{b.index}", targets=targets, max_wide=budget,
                                   candidates=cfg.bucket_candidates, probe_map=_probe_map(cfg))
        gap = "" if m.reached.cfg_gap_max is None else \
            f", CFG gap {m.all_quantized.cfg_gap_max:.3f} -> {m.reached.cfg_gap_max:.3f}"
        print(f"[qcompile] bucket {b.index}: {len(m.wide_layers)} layer(s) {kept}, probe SQNR "
              f"{m.all_quantized.sqnr_db:.2f} -> {m.reached.sqnr_db:.2f} dB{gap}"
              + ("" if m.met else " (target not reached within the budget)"), flush=True)
        out.append(m)
    return tuple(out)


# --- stage 4: quantize and emit -----------------------------------------------------------------
def quantize_stage(cfg: CompileConfig, target: Target, decisions: Decisions, names: InputNames,
                   ctx: PassContext, pinned: PinnedShapes | None = None) -> list[CompiledBucket]:
    caps = target.caps
    levels = caps.activation_dtype.qmax - caps.activation_dtype.qmin
    _stage(f"quantizing for {target.name.value}: {len(decisions.buckets)} bucket(s), estimator {cfg.estimator.value}")
    compiled = []
    for bucket in decisions.buckets:
        plan = decisions.plan_of(bucket.index)
        ranges = estimate_ranges(decisions.table, cfg.estimator, bucket.timestep_indices,
                                 names=plan.activations, levels=levels, symmetric=caps.activation_symmetric)
        job = BucketJob(bucket.index, plan, ranges, names.timestep)
        compiled.append(target.compile_bucket(pin_graph(copy_graph(decisions.graph), pinned), job, ctx))
    return compiled


def bias_correction_stage(cfg: CompileConfig, decisions: Decisions, compiled: list[CompiledBucket],
                          calibrated: Calibrated, pinned: PinnedShapes | None) -> tuple[Corrected, ...]:
    """Each bucket's int32 biases corrected by its mean error on its own calibration rows."""
    _stage(f"bias correction: {len(compiled)} bucket(s), each on up to {PROBE_ROWS} of its calibration rows")
    recording, table = calibrated.cache.recording(), decisions.table
    out = []
    for b, c in zip(decisions.buckets, compiled, strict=True):
        ts = [float(table.timesteps[i]) for i in b.timestep_indices if not np.isnan(table.timesteps[i])]
        rows = bucket_probe_rows(recording, ts, PROBE_ROWS).inputs if ts else recording.spread_rows(PROBE_ROWS)
        reference = c.float_graph if c.float_graph is not None else pin_graph(copy_graph(decisions.graph), pinned)
        done = correct_bucket(c, reference, rows)
        print(f"[qcompile] bucket {b.index}: {done.layers} bias(es) corrected, mean per-channel error "
              f"{done.mean_abs_shift_before:.4f} -> {done.mean_abs_shift_after:.4f} of the output rms", flush=True)
        out.append(done)
    return tuple(out)


# --- the manifest -------------------------------------------------------------------------------
def precision_of(target: Target) -> str:
    caps = target.caps
    if not caps.weighted_ops and not caps.int8_ops:
        return "fp32"  # a float baseline of a quantizing emitter (tflite-fp32)
    if caps.activation_dtype.is_float:
        return "fp8"  # float8 E4M3 weights and activations (trt-fp8)
    return f"w{caps.weight_dtype.bits}a{caps.activation_dtype.bits}"


def model_record(adapter) -> ModelRecord:
    names = input_names(adapter)
    axes = adapter.axes_record()
    inputs = tuple(InputRecord(s.name, tuple(s.shape), s.dtype, s.role.value, tuple(axes.get(s.name, ())))
                   for s in adapter.input_specs())
    return ModelRecord(inputs, tuple(adapter.output_names), names.sample, names.timestep,
                       float(adapter.timestep_scale))


def source_record(cfg: CompileConfig, adapter, fp32_rel: str, fingerprint: str | None,
                  model_config: str | None = None) -> SourceRecord:
    return SourceRecord(model=cfg.model, component=cfg.component, seed=cfg.seed, family=adapter.family.value,
                        class_name=type(adapter.module).__name__, fp32_model=fp32_rel, fingerprint=fingerprint,
                        model_config=model_config)


def make_manifest(cfg: CompileConfig, adapter, target: Target, exported: Exported, calibrated: Calibrated,
                  decisions: Decisions, emitted: EmitResult, ctx: PassContext, model_config: str,
                  input_shapes: dict[str, tuple[int, ...]] | None = None,
                  bucket_precision: tuple[dict[str, Any], ...] = ()) -> Manifest:
    """`bucket_precision`: per bucket, what its graph computes wide and at what cost (`wide_fractions`,
    and bias correction's record)."""
    caps, plan, cache = target.caps, decisions.plan, calibrated.cache
    table = decisions.table
    buckets = tuple(
        BucketRecord(b.index, tuple(b.timestep_range),
                     tuple(float(table.timesteps[i]) for i in sorted(b.timestep_indices)
                           if not np.isnan(table.timesteps[i])), tuple(files),
                     _bucket_precision_record(decisions, b.index, bucket_precision))
        for b, files in zip(decisions.buckets, emitted.bucket_files, strict=True))
    mixed, smoothed = decisions.mixed, decisions.smoothed
    excluded = tuple(dict.fromkeys(n for b in decisions.buckets for n in decisions.plan_of(b.index).excluded))
    wide = caps.wide_dtype.value if caps.integer_only and excluded and caps.wide_dtype is not None else None
    quantization = QuantizationRecord(
        weights=caps.weight_dtype.value + " symmetric per-channel",
        activations=caps.activation_dtype.value + (" symmetric" if caps.activation_symmetric else " asymmetric")
        + " per-tensor",
        outputs=(caps.output_dtype or caps.activation_dtype).value,
        quantized_activations=len(plan.activations), quantized_weights=len(plan.weights),
        float_layers=() if caps.integer_only else excluded,
        exclusion_patterns=decisions.exclusions, full_integer=cfg.full_integer, split_shortcut=cfg.split_shortcut,
        smoothquant=None if smoothed is None else smoothed.summary(),
        mixed_precision={
            "target_sqnr_db": mixed.target_sqnr_db, "reached_sqnr_db": round(mixed.sqnr_db, 3),
            "all_quantized_sqnr_db": round(mixed.all_quantized_sqnr_db, 3), "layers": list(mixed.float_layers),
            "fallback": caps.fallback.value if wide is None else f"{caps.fallback.value} ({wide})",
            "sensitivity_top20": [s.as_dict() for s in mixed.ranking[:20]]} if mixed is not None
        else _per_bucket_record(cfg, decisions, caps, wide),
        wide_layers=excluded if caps.integer_only else ())
    calibration = CalibrationRecord(
        spec=calibrated.spec, rows=cache.meta["samples"]["rows"], calls=cache.meta["samples"]["calls"],
        estimator=cfg.estimator.value, bucket_method=cfg.bucket_method.value, cache_fingerprint=cache.fingerprint,
        recording_fingerprint=cache.meta["fingerprints"]["recording"],
        timesteps=tuple(t for t in cache.meta["timesteps"] if t is not None) or None,
        buckets_requested=cfg.buckets)
    return Manifest(
        target=target.name.value, precision=precision_of(target), qcompile_version=tool_versions()["qcompile"],
        source=source_record(cfg, adapter, f"{FP32_DIR}/{exported.path.name}", cache.graph_fingerprint,
                             model_config),
        model=model_record(adapter), export=exported.record, calibration=calibration, quantization=quantization,
        buckets=buckets, sdk_files=tuple(emitted.sdk_files), device=dict(emitted.device),
        pass_log=tuple(e.as_dict(timing=False) for e in ctx.log), tools=tool_versions(),
        input_shapes=input_shapes or {})


def _bucket_precision_record(decisions: Decisions, bucket: int,
                             costs: tuple[dict[str, Any], ...]) -> dict[str, Any] | None:
    record: dict[str, Any] = dict(costs[bucket]) if costs else {}
    if decisions.bucket_mixed:
        record.update(decisions.bucket_mixed[bucket].as_dict())
    return record or None


def _per_bucket_record(cfg: CompileConfig, decisions: Decisions, caps, wide: str | None) -> dict[str, Any] | None:
    """The manifest's mixed-precision summary of a per-bucket choice (each bucket's own in its record)."""
    if not decisions.bucket_mixed:
        return None
    ms = decisions.bucket_mixed
    return {"per_bucket": True, "target_sqnr_db": cfg.mixed_precision_sqnr_db,
            "target_cfg_gap": cfg.mixed_precision_cfg_gap, "max_layers_per_bucket": cfg.max_float_layers,
            "candidates_per_bucket": cfg.bucket_candidates,
            "reached_sqnr_db": round(min(m.reached.sqnr_db for m in ms), 3),
            "all_quantized_sqnr_db": round(min(m.all_quantized.sqnr_db for m in ms), 3),
            "targets_met": all(m.met for m in ms), "layers": sorted({n for m in ms for n in m.wide_layers}),
            "fallback": caps.fallback.value if wide is None else f"{caps.fallback.value} ({wide})",
            "sensitivity_top20": []}


# --- the build ----------------------------------------------------------------------------------
def build(cfg: CompileConfig) -> BuildResult:
    t_start = time.perf_counter()
    target = load_target(cfg.target, cfg.target_options)  # an unknown target or bad option fails before any work
    adapter = resolve(cfg)
    calib = calibration_plan(cfg, adapter)
    exclusions(cfg, adapter, target)  # contradictory options fail before any work
    if cfg.ray is not None:
        require_ray()
    batch = target.static_batch
    pinned = pin_shapes(cfg.shapes, adapter, target.name.value, batch, calib.inputs, calib.held_out)
    names = input_names(adapter)
    with StagedFolder(cfg.out_dir) as stage:
        work, scratch = stage.path, stage.scratch()
        ctx = PassContext()
        exported = export_stage(cfg, adapter, work / FP32_DIR, ctx)
        release_torch_weights(adapter)
        calibrated = calibrate_stage(cfg, adapter, exported, calib, cfg.calib_cache or scratch / "calibration")
        decisions = decide_stage(cfg, target, adapter, exported, calibrated, scratch, pinned)
        compiled = quantize_stage(cfg, target, decisions, names, ctx, pinned)
        corrections = bias_correction_stage(cfg, decisions, compiled, calibrated, pinned) if cfg.bias_correction \
            else ()
        costs = tuple({**wide_fractions(c.graph, target.caps),
                       **({"bias_correction": corrections[c.index].as_dict()} if corrections else {})}
                      for c in compiled)
        shapes = accepted_shapes(pinned, batch)
        if shapes:
            print(f"[qcompile] {target.name.value} is built for "
                  + ", ".join(f"{k} {'x'.join(map(str, v))}" for k, v in shapes.items()), flush=True)
        _stage(f"writing the {target.name.value} artifact")
        emitted = target.emit(compiled, work)
        model_config = write_model_config(adapter.module, work)
        manifest = make_manifest(cfg, adapter, target, exported, calibrated, decisions, emitted, ctx, model_config,
                                 shapes, costs)
        manifest.write(work)

        _stage("evaluating the artifact against the float model")
        extra: dict[str, Any] = {"pass_seconds": round(sum(e.seconds for e in ctx.log), 3),
                                 "calibration_seconds": round(calibrated.seconds, 3),
                                 "calibration_reused": calibrated.reused, "buckets_requested": cfg.buckets,
                                 "float_layers": len(manifest.quantization.float_layers),
                                 "build_seconds": round(time.perf_counter() - t_start, 3)}
        mixed = decisions.mixed
        if mixed is not None:
            extra.update({"mixed_precision_layers": len(mixed.float_layers),
                          "mixed_precision_probe_sqnr_db": round(mixed.sqnr_db, 3),
                          "all_quantized_probe_sqnr_db": round(mixed.all_quantized_sqnr_db, 3)})
        report = evaluate_artifact(work, adapter, held_out=calib.held_out, thresholds=cfg.thresholds,
                                   fidelity=cfg.fidelity, extra=extra, manifest=manifest)
        # --out is replaced only by a build that passes; a miss is kept beside it for inspection
        out = stage.commit() if report["passed"] else stage.commit(failed_folder(cfg.out_dir))
    print(format_table(report), flush=True)
    if not report["passed"]:
        print(f"[qcompile] the build missed its thresholds: {cfg.out_dir} is unchanged; this build is in {out}",
              flush=True)
    return BuildResult(out, report, manifest)


def failed_folder(out: Path) -> Path:
    """Where a build that missed a threshold leaves its artifact: beside `--out`, never over it."""
    out = Path(out)
    return out.with_name(out.name + ".failed")


def write_calibration_cache(model: str, component: str | None, *, seed: int, opset: int, spec: CalibSpec | None,
                            cache_dir: Path, sampler, export_from: Path | None = None,
                            shard: Shard | None = None) -> CalibrationCache:
    """`qcompile calibrate`: record and compute statistics once; any number of builds reuse them. With
    `shard`, one shard's statistics (`qcompile merge-cache` makes the cache of all of them)."""
    if CalibrationCache.exists(cache_dir):
        raise UserError(f"--calib-cache {cache_dir}: already holds a calibration cache; choose a new folder")
    cfg = CompileConfig(model=model, component=component, out_dir=Path(cache_dir), seed=seed, opset=opset,
                        export_from=export_from, calib=spec)
    adapter = resolve(cfg)
    calib = calibration_plan(cfg, adapter)
    with tempfile.TemporaryDirectory(prefix="qcompile-export-") as tmp:
        exported = export_stage(cfg, adapter, Path(tmp), PassContext())
        part = "" if shard is None else f", shard {shard.describe()}"
        _stage(f"calibrating ({calib.spec.describe()}{part}) into {cache_dir}")
        names = input_names(adapter)
        cache, seconds, _ = open_or_calibrate(calib.spec, adapter, exported.path, exported.graph, Path(cache_dir),
                                              names=(names.sample, names.timestep), sampler=sampler, seed=seed,
                                              inputs=calib.inputs, pipeline=pipeline_of(cfg), shard=shard)
    print(f"[qcompile] calibration took {seconds:.2f}s")
    return cache


def export_only(cfg: CompileConfig) -> Path:
    """`qcompile export`: the canonical float ONNX alone, verified against torch."""
    adapter = resolve(cfg)
    with StagedFolder(cfg.out_dir) as stage:
        ctx = PassContext()
        exported = export_canonical(adapter, stage.path, opset=cfg.opset, ctx=ctx, source=model_source(cfg))
        model_config = write_model_config(adapter.module, stage.path)
        Manifest(target=FP32_TARGET, precision="fp32", qcompile_version=tool_versions()["qcompile"],
                 source=source_record(cfg, adapter, exported.path.name, None, model_config),
                 model=model_record(adapter),
                 export=exported.record, pass_log=tuple(e.as_dict(timing=False) for e in ctx.log),
                 tools=tool_versions()).write(stage.path)
        out = stage.commit()
    e = exported.record
    print(f"[qcompile] exported {out / exported.path.name} ({e.exporter}, opset {e.opset}, "
          f"max abs diff vs torch {e.max_abs_diff_vs_torch:.2e})")
    return out
