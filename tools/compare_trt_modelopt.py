"""qcompile trt-int8 / trt-fp8 against NVIDIA ModelOpt's ONNX PTQ of the same float model: same
calibration rows, same float layers, both linted by targets/tensorrt/lint.py and both emulated in
onnxruntime CPU by the same evaluation.

    pip install -c constraints.txt nvidia-modelopt==0.47.0 onnxconverter-common cppimport lief onnxslim
    qcompile build builtin:reference --target trt-int8 --calib-cache CACHE --out ART
    python tools/compare_trt_modelopt.py ART --calib-cache CACHE [--out out/trt-modelopt] [--rows 256]

ModelOpt runs on CPU (`calibration_eps=["cpu"]`, float32 high precision), in the mode of the artifact
(int8, or fp8 for trt-fp8), max calibration, with the artifact's float layers as `nodes_to_exclude`.
Writes <out>/compare.md and compare.json: lint violations per rule, eps SQNR, sample PSNR.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np

from qcompile.calibration.cache import CalibrationCache
from qcompile.config import Thresholds
from qcompile.evaluation.evaluate import evaluate_artifact, held_out_inputs
from qcompile.graph_io import load_graph
from qcompile.manifest import Manifest
from qcompile.models.source import resolve_model
from qcompile.targets.tensorrt.lint import LintRules, lint
from qcompile.targets.tensorrt.target import quiet_graphsurgeon

METRICS = ("eps_sqnr_db_mean", "eps_sqnr_db_min", "eps_cos_mean", "sample_psnr_db", "sample_ssim")


def modelopt_qdq(fp32: Path, out: Path, mode: str, cache: Path, rows: int, exclude: list[str]) -> Path:
    from modelopt.onnx.quantization import quantize

    data = CalibrationCache.open(cache).recording().spread_rows(rows)
    calib = {k: np.asarray(v) for k, v in data.take(slice(0, data.count)).items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    quantize(onnx_path=str(fp32), quantize_mode=mode, calibration_data=calib, calibration_method="max",
             output_path=str(out), calibration_eps=["cpu"], high_precision_dtype="fp32", use_external_data_format=True,
             nodes_to_exclude=exclude or None)
    return out


def as_artifact(ours: Path, model: Path, folder: Path) -> Manifest:
    """An artifact folder for ModelOpt's model, sharing qcompile's float model and manifest."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    shutil.copytree(ours / "fp32", folder / "fp32")
    files = [model.name] + sorted(p.name for p in model.parent.iterdir() if p != model and p.is_file()
                                  and p.suffix != ".onnx")
    for f in files:
        shutil.copy2(model.parent / f, folder / f)
    m = Manifest.read(ours)
    one = dataclasses.replace(m.buckets[0], timestep_range=(m.buckets[0].timestep_range[0],
                                                            m.buckets[-1].timestep_range[1]), files=tuple(files))
    m = dataclasses.replace(m, buckets=(one,), sdk_files=(), device={})
    m.write(folder)
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--calib-cache", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=Path("out/trt-modelopt"))
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--validate", type=int, default=16)
    args = ap.parse_args()
    ours = Manifest.read(args.artifact)
    mode = "fp8" if ours.target == "trt-fp8" else "int8"
    float_layers = list(ours.quantization.float_layers)
    raw = modelopt_qdq(ours.fp32_path(args.artifact), args.out / "raw" / "model.onnx", mode, args.calib_cache,
                       args.rows, float_layers)
    rows = []
    src = ours.source
    adapter = resolve_model(src.model, src.component, seed=src.seed)
    for name, folder in (("qcompile " + ours.target, args.artifact), (f"modelopt {mode}", args.out / "modelopt")):
        if folder != args.artifact:
            manifest = as_artifact(args.artifact, raw, folder)
            report = evaluate_artifact(folder, adapter, held_out=held_out_inputs(adapter, args.validate, src.seed),
                                       thresholds=Thresholds(eps_sqnr_db_mean=None, sample_psnr_db=None),
                                       manifest=manifest)
        else:
            manifest = ours
            report = json.loads((folder / "report.json").read_text())
        with quiet_graphsurgeon():  # float8 constants: graphsurgeon warns on every access
            graph = load_graph(manifest.bucket_files(folder)[0])
            found = lint(graph, LintRules(float_layers=frozenset(float_layers)))
        by_rule = Counter(v.rule.value for v in found)
        rows.append({"method": name, **{k: report["summary"].get(k) for k in METRICS},
                     "lint_violations": len(found), "by_rule": dict(by_rule),
                     "examples": [str(v) for v in found[:5]]})
    lines = ["| method | " + " | ".join(METRICS) + " | lint violations (by rule) |", "|" + "---|" * (len(METRICS) + 2)]
    for r in rows:
        rules = ", ".join(f"{k} {v}" for k, v in sorted(r["by_rule"].items())) or "none"
        lines.append(f"| {r['method']} | " + " | ".join(str(r[k]) for k in METRICS)
                     + f" | {r['lint_violations']} ({rules}) |")
    (args.out / "compare.md").write_text("\n".join(lines) + "\n")
    (args.out / "compare.json").write_text(json.dumps(rows, indent=2))
    print("\n".join(lines))
    for r in rows:
        for e in r["examples"]:
            print(f"  {r['method']}: {e}")


if __name__ == "__main__":
    main()
