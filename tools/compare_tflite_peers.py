"""qcompile's TFLite targets against the usual TFLite route, side by side on the same float model and
the same recorded calibration inputs: litert-torch converts the torch module to a float .tflite,
ai-edge-quantizer quantizes it (static int8 weights and activations, `static_wi8_ai8`, calibrated in
its own interpreter). Every file is judged by the same evaluation (teacher-forced eps metrics, free
sampling, accuracy, Fréchet distance) in the LiteRT interpreter, and timed side by side (XNNPACK,
2 threads, runs interleaved, median).

    python tools/compare_tflite_peers.py [--model builtin:reference] [--out out/tflite-peers]
        [--calib-cache CACHE] [--from-export DIR] [--rows 256] [--per-class 10]
        [--qcompile-args "" "--buckets 4"]

The peers are optional (`pip install -c constraints.txt -e ".[tflite-peers]"`: litert-torch brings jax,
about 730 MB); without them only qcompile's rows are written. Peer files get qcompile's runner
metadata (signature names mapped to the ONNX input names) and nothing else. Writes peers.md and
peers.json in --out.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import time
from pathlib import Path

import numpy as np
from bench_tflite import side_by_side  # sibling tools (tools/ is on sys.path when run)
from compare_peers import calibration_rows, wrap_as_artifact, write_table

from qcompile.artifact import read_manifest
from qcompile.atomic import atomic_path, write_json
from qcompile.cli import main as qcompile_main
from qcompile.config import FidelitySettings, Thresholds
from qcompile.evaluation.evaluate import evaluate_artifact, held_out_inputs
from qcompile.models.source import resolve_model
from qcompile.targets.tflite.emit import with_metadata
from qcompile.targets.tflite.runner import THREADS

COLUMNS = ("method", "eps_cos_mean", "eps_sqnr_db_mean", "eps_sqnr_db_min", "sample_psnr_db", "sample_ssim",
           "accuracy_q", "frechet_q", "size_bytes", "latency_ms", "xnnpack_partitions", "seconds")
PEER_SIGNATURE = "serving_default"


def litert_torch_convert(adapter, example: dict[str, np.ndarray], out: Path) -> Path:
    """The float .tflite litert-torch makes of the module qcompile exports (same inputs, batch 1)."""
    import litert_torch
    import torch

    args = tuple(torch.from_numpy(example[spec.name]) for spec in adapter.input_specs())
    litert_torch.convert(adapter.export_module().eval(), args).export(str(out))
    return out


def aeq_static_int8(fp32: Path, rows: list[dict[str, np.ndarray]], input_keys: dict[str, str], out: Path) -> Path:
    """ai-edge-quantizer's static int8 recipe, calibrated on `rows` (keyed by the peer's own input names).

    Its calibrator keeps an exponential moving average (0.95) of each row's min and max, so the last
    rows decide the ranges: fed in trajectory order (t from 999 down), the timestep input ends up
    with a range of 0..105. The rows are shuffled (seeded) so that every timestep weighs alike, the
    kindest order for this peer."""
    from ai_edge_quantizer import quantizer, recipe

    qt = quantizer.Quantizer(str(fp32))
    qt.load_quantization_recipe(recipe.static_wi8_ai8())
    order = np.random.default_rng(0).permutation(len(rows))
    data = [{input_keys[name]: value for name, value in rows[i].items()} for i in order]
    result = qt.calibrate({PEER_SIGNATURE: data})
    qt.quantize(result).export_model(str(out), overwrite=True)
    return out


def peer_input_keys(adapter, path: Path) -> dict[str, str]:
    """ONNX input name -> the peer signature's argument name (litert-torch numbers them args_0, ...)."""
    from ai_edge_litert.interpreter import Interpreter

    keys = Interpreter(model_path=str(path)).get_signature_list()[PEER_SIGNATURE]["inputs"]
    names = [spec.name for spec in adapter.input_specs()]
    if len(keys) != len(names):
        raise RuntimeError(f"{path}: {len(keys)} signature inputs for {len(names)} model inputs")
    ordered = sorted(keys, key=lambda k: int(k.rsplit("_", 1)[-1]))
    return dict(zip(names, ordered, strict=True))


def annotate_for_runner(adapter, path: Path, input_keys: dict[str, str]) -> None:
    """Add the metadata qcompile's TfliteRunner reads: the peer keeps the torch (NCHW) layout, batch 1,
    and after ai-edge-quantizer its inputs and output are int8 with their own scales (the runner
    quantizes and dequantizes at the boundary, as an application would)."""
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_path=str(path)).get_signature_runner(PEER_SIGNATURE)
    details, outs = runner.get_input_details(), runner.get_output_details()

    def entry(name: str, key: str, d: dict) -> dict:
        shape = [int(v) for v in d["shape"]]
        out = {"name": name, "key": key, "shape": shape, "perm": list(range(len(shape))),
               "dtype": np.dtype(d["dtype"]).name}
        scale, zero_point = d["quantization"]
        if scale:  # integer inputs and outputs (ai-edge-quantizer's static recipes)
            out["quant"] = [float(scale), int(zero_point)]
        return out

    out_key = next(iter(outs))
    info = {"format": 1, "batch": 1, "signatures": {PEER_SIGNATURE: {
        "inputs": [entry(n, k, details[k]) for n, k in input_keys.items()],
        "outputs": [entry(adapter.output_names[0], out_key, outs[out_key])]}}}
    data = with_metadata(path.read_bytes(), info)
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:reference")
    ap.add_argument("--out", type=Path, default=Path("out/tflite-peers"))
    ap.add_argument("--calib-cache", type=Path, default=None, help="default: OUT/calib-cache")
    ap.add_argument("--from-export", type=Path, default=None)
    ap.add_argument("--rows", type=int, default=256, help="recorded calibration rows given to the peer")
    ap.add_argument("--per-class", type=int, default=10)
    ap.add_argument("--runs", type=int, default=50, help="timed runs per file (median)")
    ap.add_argument("--qcompile-args", nargs="+", default=[""],
                    help="one qcompile tflite-int8 row per entry: extra build options (quoted)")
    args = ap.parse_args()
    cache = args.calib_cache or args.out / "calib-cache"
    args.out.mkdir(parents=True, exist_ok=True)
    rows, files = [], {}
    export, int8_artifact = args.from_export, None
    builds = [("tflite-fp32", "")] + [("tflite-int8", extra) for extra in args.qcompile_args]
    for target, extra in builds:
        t0 = time.perf_counter()
        out = args.out / f"qcompile-{target}-{len(rows)}"
        build = ["build", args.model, "--target", target, "--out", str(out), "--calib-cache", str(cache),
                 "--per-class", str(args.per_class), "--min-sqnr-db", "-1000", "--min-psnr-db", "-1000"]
        build += ["--from-export", str(export)] if export else []
        qcompile_main([*build, *shlex.split(extra)])
        export = export or out
        int8_artifact = int8_artifact or (out if target == "tflite-int8" else None)
        method = f"qcompile {target} {extra}".strip()
        rows.append({"method": method, **json.loads((out / "report.json").read_text())["summary"],
                     "seconds": round(time.perf_counter() - t0, 1)})
        files[method] = out / read_manifest(out)["buckets"][0]["files"][0]
    manifest = read_manifest(int8_artifact)
    src = manifest["source"]
    adapter = resolve_model(src["model"], src.get("component"), seed=src.get("seed", 0))
    feeds = calibration_rows(cache, args.rows)
    try:
        import ai_edge_quantizer  # noqa: F401
        import litert_torch  # noqa: F401
    except ImportError as exc:
        print(f"[peers] litert-torch / ai-edge-quantizer not installed ({exc.name}); only qcompile's rows")
    else:
        peer_dir = args.out / "peer-litert"
        shutil.rmtree(peer_dir, ignore_errors=True)
        for sub in ("raw-fp32", "raw-int8"):
            (peer_dir / sub).mkdir(parents=True)
        t0 = time.perf_counter()
        fp32 = litert_torch_convert(adapter, feeds[0], peer_dir / "raw-fp32" / "model.tflite")
        keys = peer_input_keys(adapter, fp32)
        convert_s = time.perf_counter() - t0
        int8 = aeq_static_int8(fp32, feeds, keys, peer_dir / "raw-int8" / "model.tflite")
        quantize_s = time.perf_counter() - t0 - convert_s
        for label, path, seconds in (("litert-torch fp32", fp32, convert_s),
                                     ("litert-torch + ai-edge-quantizer static int8", int8, quantize_s)):
            annotate_for_runner(adapter, path, keys)
            folder = peer_dir / label.split()[-1]
            wrap_as_artifact(int8_artifact, path, folder)
            # Judged as a tflite-fp32 artifact: the same runner, and no device check (that one compares
            # qcompile's int8 tensors with the Q/DQ graph they were lowered from, which a peer has not).
            peer_manifest = read_manifest(folder)
            peer_manifest["target"] = "tflite-fp32"
            write_json(folder / "manifest.json", peer_manifest)
            rep = evaluate_artifact(folder, adapter, held_out=held_out_inputs(adapter, 8, src.get("seed", 0)),
                                    thresholds=Thresholds(eps_sqnr_db_mean=None, sample_psnr_db=None),
                                    fidelity=FidelitySettings(per_class=args.per_class))
            rows.append({"method": label, **rep["summary"], "seconds": round(seconds, 1)})
            files[label] = folder / path.name
    timing = side_by_side(files, THREADS, args.runs)
    for row in rows:
        if row["method"] in timing:
            row["latency_ms"] = timing[row["method"]]["ms"]
            row["xnnpack_partitions"] = timing[row["method"]]["xnnpack_partitions"]
            row["size_bytes"] = timing[row["method"]]["bytes"]
    print(write_table(args.out, rows, COLUMNS))


if __name__ == "__main__":
    main()
