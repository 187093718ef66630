"""qcompile ort-int8 against peer quantizers, side by side: same float model, same calibration inputs,
same evaluation (teacher-forced eps metrics, and sample metrics for models that can sample).

    python tools/compare_peers.py [--model builtin:reference] [--out out/peers] [--calib sample:32]
        [--qcompile-args "--buckets 4 --estimator mse"] [--rows 256]

Peers: onnxruntime `quantize_static` (QDQ, per-channel, U8S8: what its docs recommend for x86 CPU),
and NVIDIA ModelOpt ONNX int8 PTQ when `modelopt` is importable (optional extra `peers`). Each peer
model is wrapped as an artifact folder next to qcompile's and judged by the same `evaluate_artifact`.
Writes out/peers/peers.md and peers.json.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import time
from pathlib import Path

import numpy as np

from qcompile.artifact import read_manifest
from qcompile.atomic import write_json
from qcompile.calibration.cache import CalibrationCache
from qcompile.cli import main as qcompile_main
from qcompile.config import Thresholds
from qcompile.evaluation.evaluate import evaluate_artifact, held_out_inputs
from qcompile.models.source import resolve_model

COLUMNS = ("method", "eps_cos_mean", "eps_sqnr_db_mean", "eps_sqnr_db_min", "sample_psnr_db", "sample_ssim",
           "accuracy_q", "frechet_q", "size_bytes", "seconds")


def calibration_rows(cache_dir: Path, rows: int) -> list[dict[str, np.ndarray]]:
    """The recorded calibration inputs (spread over timesteps), one dict per batch-1 row."""
    data = CalibrationCache.open(cache_dir).recording().spread_rows(rows)
    return [data.take(slice(i, i + 1)) for i in range(data.count)]


def untie_initializers(src: Path, dst: Path) -> Path:
    """The same model with every initializer renamed `qc_init_<i>` and each use given its own copy.

    onnxruntime's quantizer clones a shared initializer as name + "1", which collides with the dynamo
    exporter's `val_N` names and aborts ("shared mode is not supported for weight"); an untied copy
    is the same function, so the comparison stays fair."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    del model.graph.initializer[:]
    count = 0
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in inits:
                new = f"qc_init_{count}"
                count += 1
                model.graph.initializer.append(numpy_helper.from_array(inits[name], new))
                node.input[i] = new
    onnx.save_model(model, str(dst), save_as_external_data=True, location=dst.name + ".data", size_threshold=1024)
    return dst


def ort_quantize_static(fp32: Path, out: Path, feeds: list[dict[str, np.ndarray]]) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    fp32 = untie_initializers(fp32, out.with_name("untied.onnx"))

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(fp32), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, use_external_data_format=True)


def modelopt_quantize(fp32: Path, out: Path, feeds: list[dict[str, np.ndarray]]) -> None:
    from modelopt.onnx.quantization import quantize

    calib = {k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]}
    quantize(onnx_path=str(fp32), quantize_mode="int8", calibration_data=calib, calibration_method="max",
             output_path=str(out), calibration_eps=["cpu"], high_precision_dtype="fp32", use_external_data_format=True)


PEERS = {"onnxruntime quantize_static": ort_quantize_static, "nvidia-modelopt int8": modelopt_quantize}


def wrap_as_artifact(reference_artifact: Path, model: Path, folder: Path) -> None:
    """An artifact folder for a peer's QDQ model, sharing the float model and manifest of qcompile's."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copytree(reference_artifact / "fp32", folder / "fp32", dirs_exist_ok=True)
    manifest = read_manifest(reference_artifact)
    files = [model.name] + [p.name for p in model.parent.iterdir()
                            if p != model and p.is_file() and not p.name.startswith("untied")]
    manifest["buckets"] = [{"index": 0, "timestep_range": manifest["buckets"][0]["timestep_range"][:1]
                            + manifest["buckets"][-1]["timestep_range"][1:], "files": files}]
    for f in files:
        shutil.copy2(model.parent / f, folder / f)
    write_json(folder / "manifest.json", manifest)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:reference")
    ap.add_argument("--out", type=Path, default=Path("out/peers"))
    ap.add_argument("--calib", default=None)
    ap.add_argument("--rows", type=int, default=256, help="calibration rows given to the peers")
    ap.add_argument("--qcompile-args", nargs="+", default=["", "--full-integer"],
                    help="one qcompile row per entry: extra build options (quoted)")
    args = ap.parse_args()
    cache = args.out / "calib-cache"
    rows = []
    ours = None
    for i, extra in enumerate(args.qcompile_args):
        t0 = time.perf_counter()
        out = args.out / f"qcompile-{i}"
        build_args = ["build", args.model, "--out", str(out), "--calib-cache", str(cache), "--min-sqnr-db", "-1000"]
        build_args += ["--calib", args.calib] if args.calib else []
        build_args += ["--from-export", str(ours)] if ours else []
        qcompile_main([*build_args, *shlex.split(extra)])
        report = json.loads((out / "report.json").read_text())
        rows.append({"method": f"qcompile ort-int8 {extra}".strip(), **report["summary"],
                     "seconds": round(time.perf_counter() - t0, 1)})
        ours = ours or out
    manifest = read_manifest(ours)
    src = manifest["source"]
    adapter = resolve_model(src["model"], src.get("component"), seed=src.get("seed", 0))
    feeds = calibration_rows(cache, args.rows)
    for name, quantize in PEERS.items():
        t0 = time.perf_counter()
        work = args.out / ("peer-" + name.split()[0])
        shutil.rmtree(work, ignore_errors=True)
        (work / "raw").mkdir(parents=True)
        try:
            quantize(ours / "fp32" / "model.onnx", work / "raw" / "model.onnx", feeds)
        except ImportError as exc:
            print(f"[peers] {name}: not installed ({exc.name}); skipped")
            continue
        except Exception as exc:  # a peer failing on a diffusers graph is a result worth reporting
            print(f"[peers] {name} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            rows.append({"method": f"{name} (failed: {type(exc).__name__})"})
            continue
        wrap_as_artifact(ours, work / "raw" / "model.onnx", work / "artifact")
        rep = evaluate_artifact(work / "artifact", adapter, held_out=held_out_inputs(adapter, 8, src.get("seed", 0)),
                                thresholds=Thresholds(eps_sqnr_db_mean=None))
        rows.append({"method": name, **rep["summary"], "seconds": round(time.perf_counter() - t0, 1)})
    print(write_table(args.out, rows, COLUMNS))


def write_table(out: Path, rows: list[dict], columns: tuple[str, ...]) -> str:
    """peers.md (a markdown table of `columns`) and peers.json (every field) in `out`; returns the table."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |" for r in rows]
    (out / "peers.md").write_text("\n".join(lines) + "\n")
    (out / "peers.json").write_text(json.dumps(rows, indent=2, default=str))
    return "\n".join(lines)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.2f}"
    return str(v)


if __name__ == "__main__":
    main()
