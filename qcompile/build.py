"""One build: export -> canonicalize -> calibrate -> quantize per bucket -> emit -> validate -> report.

Everything is written into a staging folder that replaces `--out` only when the build finishes, so a
failed or interrupted build leaves nothing that looks complete and loses nothing the user had.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qcompile.artifact import (
    MANIFEST,
    MANIFEST_FORMAT,
    arrays_fingerprint,
    file_fingerprint,
    tool_versions,
)
from qcompile.atomic import StagedFolder, write_json
from qcompile.calibration.inputs import InputSet, load_npz, synthetic_inputs
from qcompile.calibration.observe import collect_minmax
from qcompile.calibration.ranges import estimate_ranges
from qcompile.config import CalibKind, CompileConfig
from qcompile.errors import UserError
from qcompile.evaluation.evaluate import evaluate_artifact, held_out_inputs
from qcompile.evaluation.report import format_table
from qcompile.graph_io import load_graph, save_graph
from qcompile.pass_manager import PassContext, PassManager
from qcompile.passes.canonicalize import canonicalize_passes
from qcompile.passes.insert_qdq import plan_quantization
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


def export_canonical(adapter, folder: Path, *, opset: int, ctx: PassContext) -> tuple[Path, Any]:
    """Export the float model and canonicalize it; returns the canonical model path and the export record."""
    from qcompile.export import export_onnx

    scratch = folder / ".export"
    raw = export_onnx(adapter, scratch / "exported.onnx", opset=opset)
    graph = load_graph(raw.onnx_path)
    PassManager(canonicalize_passes(), fixed_point=True).run(graph, ctx)
    path = save_graph(graph, folder / "model.onnx")
    shutil.rmtree(scratch)
    return path, raw


def input_roles(adapter) -> tuple[str | None, str | None]:
    """Names of the sample and timestep inputs (None when the model has none)."""
    from qcompile.models.base import InputRole, NoiseSchedule

    specs = adapter.input_specs()
    sample = next((s.name for s in specs if s.role is InputRole.SAMPLE), None)
    timestep = next((s.name for s in specs if s.role is InputRole.TIMESTEP), None)
    if adapter.noise_schedule is NoiseSchedule.NONE:
        timestep = None
    return sample, timestep


def calibration_sets(cfg: CompileConfig, adapter) -> tuple[InputSet, InputSet]:
    """(calibration, validation): validation inputs are never used for calibration."""
    if cfg.calib.kind is CalibKind.SYNTHETIC:
        calib = synthetic_inputs(adapter, cfg.calib.count, seed=cfg.seed)
        return calib, held_out_inputs(adapter, cfg.validate_count, cfg.seed)
    names = [s.name for s in adapter.input_specs()]
    _, timestep = input_roles(adapter)
    unbatched = frozenset(s.name for s in adapter.input_specs() if not s.batched)
    data = load_npz(cfg.calib.path, names, timestep, unbatched)
    if data.count >= 4:
        held = max(1, data.count // 4)
        return data.split(data.count - held)
    return data, held_out_inputs(adapter, cfg.validate_count, cfg.seed)


def exclusions(cfg: CompileConfig, adapter) -> tuple[str, ...]:
    if cfg.full_integer:
        if cfg.exclude:
            raise UserError("--full-integer and --exclude contradict each other: choose one")
        return ()
    return (*adapter.default_float_scopes(), *cfg.exclude)


def build(cfg: CompileConfig) -> BuildResult:
    t_start = time.perf_counter()
    target = load_target(cfg.target)  # an unknown target fails before any work
    adapter = resolve(cfg)
    calib, held_out = calibration_sets(cfg, adapter)
    with StagedFolder(cfg.out_dir) as stage:
        work = stage.path
        ctx = PassContext()
        _stage(f"exporting {type(adapter.module).__name__} ({adapter.family.value}) to ONNX")
        fp32_path, exported = export_canonical(adapter, work / FP32_DIR, opset=cfg.opset, ctx=ctx)
        sample_name, timestep_name = input_roles(adapter)

        graph = load_graph(fp32_path)
        excluded = exclusions(cfg, adapter)
        plan = plan_quantization(graph, target.caps, excluded)
        t0 = _stage(f"calibrating {len(plan.activations)} activations on {calib.count} inputs ({cfg.calib.describe()})")
        stats = collect_minmax(fp32_path, plan.activations, calib)
        t_calib = time.perf_counter() - t0
        ranges = estimate_ranges(stats, cfg.estimator)

        _stage(f"quantizing for {target.name.value}")
        PassManager(target.pipeline(plan, ranges)).run(graph, ctx)
        files = target.emit(graph, work, "model")
        bucket = {"index": 0, "timestep_range": [0.0, float(adapter.timestep_scale)],
                  "files": [p.name for p in files]}
        manifest = _manifest(cfg, adapter, target, exported, fp32_path, calib, plan, ctx, [bucket],
                             sample_name, timestep_name)
        write_json(work / MANIFEST, manifest)

        _stage("evaluating the artifact against the float model")
        report = evaluate_artifact(work, adapter, held_out=held_out, thresholds=cfg.thresholds, fidelity=cfg.fidelity,
                                   extra={"calibration_seconds": round(t_calib, 3),
                                          "build_seconds": round(time.perf_counter() - t_start, 3)})
        out = stage.commit()
    print(format_table(report), flush=True)
    return BuildResult(out, report, manifest)


def _precision(target) -> str:
    caps = target.caps
    return f"w{caps.weight_dtype.bits}a{caps.activation_dtype.bits}"


def _manifest(cfg, adapter, target, exported, fp32_path: Path, calib: InputSet, plan, ctx: PassContext,
              buckets: list[dict[str, Any]], sample_name: str | None, timestep_name: str | None) -> dict[str, Any]:
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
            "fingerprint": file_fingerprint([fp32_path, fp32_path.with_name(fp32_path.name + ".data")]),
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
            "spec": cfg.calib.describe(),
            "count": calib.count,
            "estimator": cfg.estimator.value,
            "fingerprint": arrays_fingerprint(calib.arrays),
            "timesteps": None if calib.timesteps is None else [float(t) for t in np.sort(calib.timesteps)],
        },
        "quantization": {
            "weights": target.caps.weight_dtype.value + " symmetric per-channel",
            "activations": target.caps.activation_dtype.value
            + (" symmetric" if target.caps.activation_symmetric else " asymmetric") + " per-tensor",
            "quantized_activations": len(plan.activations),
            "quantized_weights": len(plan.weights),
            "float_layers": list(plan.excluded),
            "exclusion_patterns": list(exclusions(cfg, adapter)),
            "full_integer": cfg.full_integer,
        },
        "buckets": buckets,
        "pass_log": [e.as_dict() for e in ctx.log],
        "tools": tool_versions(),
    }


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


