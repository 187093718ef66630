"""Evaluate an artifact folder against its own float model: what `qcompile build` ends with and
`qcompile eval DIR` runs on its own.

Models that can sample (they provide a SamplingSetup, like builtin:reference) are judged through a
real sampling loop: per-step metrics are teacher-forced on the float trajectory, sample metrics come
from free-running sampling. Other components are compared on held-back inputs, one per timestep.
Every timestep bucket is judged: held-back inputs are topped up with synthetic ones at a timestep of
each bucket the given inputs do not reach, so no bucket's graph ships unchecked.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from qcompile.artifact import REPORT_HTML, REPORT_JSON, files_size
from qcompile.calibration.inputs import InputSet, synthetic_inputs
from qcompile.config import FidelitySettings, TargetName, Thresholds
from qcompile.evaluation.fidelity import evaluate_sampling, sample_grid_png
from qcompile.evaluation.report import make_report, summarize, write_reports
from qcompile.evaluation.validate import compare_on_inputs, validation_batch
from qcompile.manifest import Manifest
from qcompile.runtime import OnnxRunner
from qcompile.target import DeviceEvidence, load_target

HELD_OUT_SEED_OFFSET = 10_007


def held_out_inputs(adapter, count: int, seed: int, manifest: Manifest | None = None) -> InputSet:
    """Synthetic inputs from seeds calibration never uses. A static artifact built for other sizes than
    the model's defaults (`manifest.input_shapes`) gets random inputs at its sizes instead (said once)."""
    held = synthetic_inputs(adapter, count, seed=seed + HELD_OUT_SEED_OFFSET)
    sizes = adapter.sizes_of(dict(manifest.input_shapes)) if manifest is not None else {}
    if not sizes or sizes == adapter.sizes_of({k: v.shape for k, v in held.arrays.items()}):
        return held
    print(f"[qcompile] the artifact is built for {sizes}: validating on random inputs at those sizes "
          "(synthetic ones exist at the model's defaults only)", flush=True)
    arrays = adapter.dummy_inputs(batch=count, seed=seed + HELD_OUT_SEED_OFFSET, sizes=sizes)
    name = manifest.model.timestep_input
    if name is not None and held.timesteps is not None:
        arrays[name] = held.timesteps.astype(arrays[name].dtype)
    return InputSet(arrays, held.timesteps, held.unbatched)


def cover_buckets(held_out: InputSet, manifest: Manifest, adapter, seed: int) -> InputSet:
    """`held_out` plus one synthetic input for each bucket none of its rows falls in, at the middle of
    that bucket's calibrated timesteps (or of its range)."""
    if held_out.timesteps is None or len(manifest.buckets) < 2:
        return held_out
    edges = np.asarray(manifest.bucket_edges, np.float64)
    covered = set(np.searchsorted(edges, held_out.timesteps.astype(np.float64), side="right").tolist())
    missing = [b for b in manifest.buckets if b.index not in covered]
    if not missing:
        return held_out
    ts = np.array([b.calibration_timesteps[len(b.calibration_timesteps) // 2] if b.calibration_timesteps
                   else (b.timestep_range[0] + b.timestep_range[1]) / 2 for b in missing], np.float32)
    arrays = adapter.synthetic_inputs(ts, seed=seed + HELD_OUT_SEED_OFFSET + 1)
    sizes = adapter.sizes_of({k: v.shape for k, v in held_out.arrays.items()})
    # held-out rows at other sizes than the defaults: random rows at theirs
    if sizes != adapter.sizes_of({k: v.shape for k, v in arrays.items()}):
        arrays = adapter.dummy_inputs(batch=len(ts), seed=seed + HELD_OUT_SEED_OFFSET + 1, sizes=sizes)
        if manifest.model.timestep_input is not None:
            arrays[manifest.model.timestep_input] = ts.astype(arrays[manifest.model.timestep_input].dtype)
    extra = InputSet(arrays, ts, held_out.unbatched)
    print(f"[qcompile] held-out inputs reach no timestep of bucket(s) {', '.join(str(b.index) for b in missing)}: "
          f"adding a synthetic input at t = {', '.join(f'{t:g}' for t in ts)} for each", flush=True)
    return held_out.concat(extra)


def uninformative_inputs(held_out: InputSet, sample_input: str | None) -> str | None:
    """Why held-out inputs cannot judge an artifact (every row the same, or a constant sample such as all
    zeros: a quantized graph that maps everything to one value would pass), else None."""
    batched = {k: np.asarray(v) for k, v in held_out.arrays.items() if k not in held_out.unbatched}
    if held_out.count > 1 and all(np.array_equal(v, v[:1].repeat(len(v), axis=0)) for v in batched.values()):
        return f"all {held_out.count} held-out rows are identical"
    if sample_input in batched:
        x = batched[sample_input]
        if x.size and float(x.max()) == float(x.min()):
            return f"the held-out '{sample_input}' is constant ({float(x.min()):g} everywhere)"
    return None


def evaluate_artifact(folder: Path, adapter, *, held_out: InputSet, thresholds: Thresholds,
                      fidelity: FidelitySettings | None = None, extra: dict[str, Any] | None = None,
                      manifest: Manifest | None = None) -> dict[str, Any]:
    """Run the checks, write report.json and report.html into `folder`, return the report."""
    folder = Path(folder)
    manifest = manifest if manifest is not None else Manifest.read(folder)
    target = load_target(TargetName.parse(manifest.target))
    model = manifest.model
    fp32_path = manifest.fp32_path(folder)
    reference = OnnxRunner([fp32_path], timestep_name=model.timestep_input, sample_name=model.sample_input)
    runner = target.runner(folder, manifest)
    held_out = cover_buckets(held_out, manifest, adapter, manifest.source.seed)

    t0 = time.perf_counter()
    setup = adapter.sampling()
    images: dict[str, str] = {}
    summary_extra: dict[str, Any] = dict(extra or {})
    settings = fidelity or FidelitySettings()
    if setup is not None and model.timestep_input is not None:
        print(f"[qcompile] sampling {settings.per_class} per class with {settings.sampler.scheduler.value}, "
              f"{settings.sampler.steps} steps, guidance {settings.sampler.guidance}", flush=True)
        result = evaluate_sampling(reference, runner, setup, settings, sample_name=model.sample_input,
                                   timestep_name=model.timestep_input, bucket_of=runner.bucket_of)
        steps = result.steps
        summary_extra.update(result.summary)
        summary_extra["sampler"] = f"{settings.sampler.scheduler.value}/{settings.sampler.steps}" \
                                   f"/cfg{settings.sampler.guidance}"
        images["Samples: fp32 (left) and quantized (right), same seeds"] = sample_grid_png(result)
    else:
        steps = compare_on_inputs(reference, runner, held_out, bucket_of=runner.bucket_of,
                                  batch=validation_batch(fp32_path, held_out))
        why = uninformative_inputs(held_out, model.sample_input)
        if why is not None:
            print(f"[qcompile] warning: the validation inputs cannot judge this artifact: {why}", flush=True)
            summary_extra["validation_warning"] = why
    # The device check opens what it needs itself (a runner reloads on its next run): what the
    # comparison loaded is let go first, so the check's own models never sit beside it.
    reference.release()
    runner.release()
    evidence = DeviceEvidence(adapter, held_out, reference, runner, settings.sampler, settings.device_samples)
    print(f"[qcompile] checking the artifact on the device ({target.name.value})", flush=True)
    device = target.device_checks(folder, manifest, evidence)
    if device is not None:
        summary_extra.update(device.summary)
    summary_extra["eval_seconds"] = round(time.perf_counter() - t0, 3)

    fp32_files = [fp32_path.name, fp32_path.name + ".data"]
    summary = summarize(steps, size_bytes=files_size(folder, manifest.runtime_files()),
                        fp32_size_bytes=files_size(fp32_path.parent, fp32_files), extra=summary_extra)
    report = make_report(target=target.name.value, precision=manifest.precision, buckets=manifest.buckets,
                         runtime={"name": target.runtime_name, "version": target.runtime_version()},
                         steps=steps, summary=summary, thresholds=thresholds)
    if device is not None:
        report["device"] = device.as_dict()
        report["checks"].update(device.checks)
    mixed = manifest.quantization.mixed_precision if manifest.quantization is not None else None
    if mixed:
        report["sensitivity_top20"] = mixed["sensitivity_top20"]
        if mixed.get("per_bucket"):  # every bucket's targets (SQNR, CFG gap) on its own probe rows
            if mixed["target_sqnr_db"] is not None or mixed["target_cfg_gap"] is not None:
                report["checks"]["mixed_precision_target_reached"] = bool(mixed["targets_met"])
        elif mixed["target_sqnr_db"] is not None:  # an unreachable target is a miss, like a threshold
            report["checks"]["mixed_precision_target_reached"] = mixed["reached_sqnr_db"] >= mixed["target_sqnr_db"]
    if "validation_warning" in summary_extra:
        report["checks"]["validation_inputs_informative"] = False
    report["passed"] = all(report["checks"].values())
    write_reports(folder, report, json_name=REPORT_JSON, html_name=REPORT_HTML, images=images)
    return report
