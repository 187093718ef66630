"""Evaluate an artifact folder against its own float model: what `qcompile build` ends with and
`qcompile eval DIR` runs on its own.

Models that can sample (they provide a SamplingSetup, like builtin:reference) are judged through a
real sampling loop: per-step metrics are teacher-forced on the float trajectory, sample metrics come
from free-running sampling. Other components are compared on held-back inputs, one per timestep.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from qcompile.artifact import REPORT_HTML, REPORT_JSON, files_size, read_manifest
from qcompile.calibration.inputs import InputSet, synthetic_inputs
from qcompile.config import TargetName, Thresholds
from qcompile.evaluation.fidelity import FidelitySettings, evaluate_sampling, sample_grid_png
from qcompile.evaluation.report import make_report, summarize, write_reports
from qcompile.evaluation.validate import compare_on_inputs
from qcompile.runtime import OnnxRunner
from qcompile.target import load_target

HELD_OUT_SEED_OFFSET = 10_007


def held_out_inputs(adapter, count: int, seed: int) -> InputSet:
    """Synthetic inputs from seeds calibration never uses."""
    return synthetic_inputs(adapter, count, seed=seed + HELD_OUT_SEED_OFFSET)


def evaluate_artifact(folder: Path, adapter, *, held_out: InputSet, thresholds: Thresholds,
                      fidelity: FidelitySettings | None = None, extra: dict[str, Any] | None = None,
                      sensitivity: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Run the checks, write report.json and report.html into `folder`, return the report."""
    manifest = read_manifest(folder)
    target = load_target(TargetName.parse(manifest["target"]))
    model = manifest["model"]
    fp32_path = folder / manifest["source"]["fp32_model"]
    reference = OnnxRunner([fp32_path], timestep_name=model["timestep_input"], sample_name=model["sample_input"])
    runner = target.runner(folder, manifest)
    bucket_of = getattr(runner, "bucket_of", lambda t: 0)

    t0 = time.perf_counter()
    setup = adapter.sampling()
    images: dict[str, str] = {}
    summary_extra: dict[str, Any] = dict(extra or {})
    settings = fidelity or FidelitySettings()
    if setup is not None and model["timestep_input"] is not None:
        print(f"[qcompile] sampling {settings.per_class} per class with {settings.sampler.scheduler.value}, "
              f"{settings.sampler.steps} steps, guidance {settings.sampler.guidance}", flush=True)
        result = evaluate_sampling(reference, runner, setup, settings, sample_name=model["sample_input"],
                                   timestep_name=model["timestep_input"], bucket_of=bucket_of)
        steps = result.steps
        summary_extra.update(result.summary)
        summary_extra["sampler"] = f"{settings.sampler.scheduler.value}/{settings.sampler.steps}" \
                                   f"/cfg{settings.sampler.guidance}"
        images["Samples: fp32 (left) and quantized (right), same seeds"] = sample_grid_png(result)
    else:
        steps = compare_on_inputs(reference, runner, held_out, bucket_of=bucket_of)
    device = None
    if hasattr(target, "device_checks"):  # targets with a device (simulator) to prove the artifact on
        print(f"[qcompile] checking the artifact on the device ({target.name.value})", flush=True)
        device = target.device_checks(folder, manifest, adapter=adapter, held_out=held_out, reference=reference,
                                      artifact_runner=runner, sampler=settings.sampler,
                                      samples=settings.device_samples)
        summary_extra.update(device["summary"])
    summary_extra["eval_seconds"] = round(time.perf_counter() - t0, 3)

    files = sorted({f for b in manifest["buckets"] for f in b["files"]})
    fp32_files = [fp32_path.name, fp32_path.name + ".data"]
    summary = summarize(steps, size_bytes=files_size(folder, files),
                        fp32_size_bytes=files_size(fp32_path.parent, fp32_files), extra=summary_extra)
    report = make_report(target=target.name.value, precision=manifest["precision"], buckets=manifest["buckets"],
                         runtime={"name": target.runtime_name, "version": target.runtime_version()},
                         steps=steps, summary=summary, thresholds=thresholds)
    if device is not None:
        report["device"] = device
        report["checks"].update(device["checks"])
        report["passed"] = all(report["checks"].values())
    if sensitivity is None:  # `qcompile eval` keeps what the build measured
        sensitivity = manifest.get("quantization", {}).get("mixed_precision", {}) or {}
        sensitivity = sensitivity.get("sensitivity_top20")
    if sensitivity:
        report["sensitivity_top20"] = sensitivity
    write_reports(folder, report, json_name=REPORT_JSON, html_name=REPORT_HTML, images=images)
    return report
