"""What a user with an NVIDIA GPU and TensorRT >= 10 runs to check the trt targets end to end.

    pip install 'qcompile[trt]'          # tensorrt + polygraphy (tensorrt from NVIDIA's index)
    python tools/trt_gpu_check.py [--model builtin:reference | DIFFUSERS_UNET_FOLDER] [--buckets 4]
        [--out out/trt-check] [--calib sample:32] [--iters 50]

For one diffusers UNet it builds, from one calibration cache and one export:
  fp32/fp16  an engine of the float ONNX (fp16: TensorRT 10's FP16 flag on a weakly typed network;
             TensorRT 11 has no precision flags, so there the row is the float graph strongly typed);
  trt-int8 and trt-fp8 with 1 bucket and with --buckets K (one engine, a bucket input), the bucket
             rescale both before the layers (bit-exact form) and after them (the form TensorRT can fuse);
and prints, per engine: latency per call (median of --iters at the profile's optimum shape, after a
warm-up), and fidelity against the FP16 engine and against onnxruntime's FP32 on the same inputs
(SQNR dB), plus the engine's agreement with qcompile's onnxruntime emulation of the same Q/DQ graph.
Writes <out>/trt_gpu_check.json and .md.

Not run by qcompile's developers: their machines have no GPU and TensorRT does not install there.
The script uses only qcompile's own build and Polygraphy's documented loaders; every number it prints
is measured on the machine that runs it. Report what you find (numbers and the sidecar JSONs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from qcompile.config import CalibSpec, CompileConfig, TargetName, Thresholds
from qcompile.manifest import Manifest
from qcompile.runtime import make_session
from qcompile.stages import build
from qcompile.targets.tensorrt import engine
from qcompile.targets.tensorrt.options import RescaleAt, TrtOptions

TARGETS = (TargetName.TRT_INT8, TargetName.TRT_FP8)


def sqnr_db(ref: np.ndarray, got: np.ndarray) -> float:
    err = np.sum((ref.astype(np.float64) - got.astype(np.float64)) ** 2)
    return float("inf") if err == 0 else float(10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / err))


def inputs_at_opt(manifest: Manifest, shapes: dict, seed: int) -> dict[str, np.ndarray]:
    """Random inputs at the profile's optimum shapes; timesteps spread over the model's range."""
    rng = np.random.default_rng(seed)
    out = {}
    for rec in manifest.model.inputs:
        shape = tuple(shapes[rec.name]["opt"])
        if rec.name == manifest.model.timestep_input:
            out[rec.name] = rng.uniform(0, manifest.model.timestep_scale, shape).astype(rec.dtype)
        elif np.issubdtype(np.dtype(rec.dtype), np.integer):
            out[rec.name] = rng.integers(0, 16, shape).astype(rec.dtype)
        else:
            out[rec.name] = rng.standard_normal(shape).astype(rec.dtype)
    return out


def time_engine(runner: engine.EngineRunner, feed: dict, iters: int) -> tuple[np.ndarray, float]:
    out = runner.run(feed)
    for _ in range(3):
        runner.run(feed)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        runner.run(feed)
        times.append(time.perf_counter() - t0)
    return np.asarray(out), statistics.median(times) * 1000


def float_engine(onnx_path: Path, out: Path, shapes: dict, fp16: bool) -> Path:
    """The float baseline: FP16 by builder flag where TensorRT still has it (10.x), else strongly typed."""
    import tensorrt as trt
    from polygraphy.backend.trt import CreateConfig, EngineFromNetwork, NetworkFromOnnxPath, Profile, SaveEngine

    profile = Profile()
    for name, s in shapes.items():
        profile.add(name, min=tuple(s["min"]), opt=tuple(s["opt"]), max=tuple(s["max"]))
    flags = int(trt.__version__.split(".")[0]) < 11 and fp16
    network = NetworkFromOnnxPath(str(onnx_path), strongly_typed=not flags)
    config = CreateConfig(profiles=[profile], fp16=True) if flags else CreateConfig(profiles=[profile])
    SaveEngine(EngineFromNetwork(network, config=config), str(out))()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:reference")
    ap.add_argument("--component", default=None)
    ap.add_argument("--out", type=Path, default=Path("out/trt-check"))
    ap.add_argument("--calib", default=None)
    ap.add_argument("--buckets", type=int, default=4)
    ap.add_argument("--iters", type=int, default=50)
    args = ap.parse_args()
    why = engine.unavailable()
    if why is not None:
        raise SystemExit(f"trt_gpu_check: {why}; this check needs TensorRT >= 10 and an NVIDIA GPU")
    cache, export_from, artifacts = args.out / "calib-cache", None, {}
    variants = [(1, RescaleAt.INPUT)] + ([(args.buckets, RescaleAt.INPUT), (args.buckets, RescaleAt.OUTPUT)]
                                         if args.buckets > 1 else [])
    for target in TARGETS:
        for k, at in variants:
            name = f"{target.value} K={k}" + (f" rescale at {at.value}" if k > 1 else "")
            cfg = CompileConfig(model=args.model, component=args.component, target=target,
                                out_dir=args.out / name.replace(" ", "-").replace("=", ""), calib_cache=cache,
                                export_from=export_from, calib=CalibSpec.parse(args.calib) if args.calib else None,
                                buckets=k, target_options=TrtOptions(timing_cache=args.out / "timing.cache",
                                                                     bucket_rescale=at),
                                thresholds=Thresholds(eps_sqnr_db_mean=None, sample_psnr_db=None))
            result = build(cfg)
            export_from = export_from or result.out_dir
            artifacts[name] = (result.out_dir, result.report)
    first_dir = next(iter(artifacts.values()))[0]
    manifest = Manifest.read(first_dir)
    shapes = engine.profiles(manifest.model.inputs, 8)
    feed = inputs_at_opt(manifest, shapes, seed=1)
    fp32 = make_session(manifest.fp32_path(first_dir)).run(None, feed)[0]
    rows = []
    baseline = None
    for name, fp16 in (("fp32", False), ("fp16", True)):
        path = float_engine(manifest.fp32_path(first_dir), args.out / f"{name}.engine", shapes, fp16)
        runner = _runner(path, manifest)
        out, ms = time_engine(runner, feed, args.iters)
        runner.close()
        baseline = out if name == "fp16" else baseline
        rows.append({"engine": name, "ms_per_call": round(ms, 3), "sqnr_vs_fp32_ort_db": round(sqnr_db(fp32, out), 2)})
    for name, (folder, report) in artifacts.items():
        m = Manifest.read(folder)
        sidecar = report.get("device", {}).get("tensorrt", {})
        path = folder / (sidecar.get("engine") or "trt/model.engine")
        engine_feed = dict(feed)
        timesteps = feed[m.model.timestep_input].reshape(-1) if m.model.timestep_input else None
        if m.device.get("bucket_input"):
            bucket = int(np.searchsorted(np.asarray(m.bucket_edges), float(timesteps[0]), side="right"))
            engine_feed[m.device["bucket_input"]] = np.array([bucket], np.int64)
            emulated = make_session(folder / m.device["engine_onnx"], optimize=False).run(None, engine_feed)[0]
        else:
            emulated = make_session(m.bucket_files(folder)[0], optimize=False).run(None, feed)[0]
        runner = engine.EngineRunner(path)
        out, ms = time_engine(runner, engine_feed, args.iters)
        runner.close()
        rows.append({"engine": name, "ms_per_call": round(ms, 3), "sqnr_vs_fp32_ort_db": round(sqnr_db(fp32, out), 2),
                     "sqnr_vs_fp16_engine_db": round(sqnr_db(baseline, out), 2),
                     "sqnr_vs_emulation_db": round(sqnr_db(emulated, out), 2),
                     "emulated_eps_sqnr_db_mean": report["summary"].get("eps_sqnr_db_mean"),
                     "emulated_sample_psnr_db": report["summary"].get("sample_psnr_db")})
    cols = sorted({c for r in rows for c in r}, key=lambda c: list(rows[-1]).index(c) if c in rows[-1] else 0)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    import tensorrt as trt

    header = f"TensorRT {trt.__version__}, {engine.gpu_name()}, batch {feed[next(iter(feed))].shape[0]}\n\n"
    (args.out / "trt_gpu_check.md").write_text(header + "\n".join(lines) + "\n")
    (args.out / "trt_gpu_check.json").write_text(json.dumps({"tensorrt": trt.__version__, "rows": rows}, indent=2))
    print(header + "\n".join(lines))


def _runner(path: Path, manifest: Manifest) -> engine.EngineRunner:
    path.with_name(path.name + ".json").write_text(json.dumps({"outputs": list(manifest.model.outputs)}))
    return engine.EngineRunner(path)


if __name__ == "__main__":
    main()
