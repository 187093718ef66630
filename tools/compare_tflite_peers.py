"""qcompile's TFLite targets against the usual TFLite route, like for like on the same float model and
the same calibration rows: litert-torch converts the torch module to a float .tflite, ai-edge-quantizer
quantizes it (static int8 weights and activations, `static_wi8_ai8`, calibrated in its own
interpreter) on every row qcompile recorded (written once to OUT/calibration.npz), twice: as shipped,
and with qcompile's float layers left float through its own recipe (`no_quantize` on the scopes of
the same top-level modules). Every file is judged by the same evaluation (teacher-forced eps
metrics, free sampling, accuracy, Fréchet distance) in the LiteRT interpreter, and timed side by side
(XNNPACK, 2 threads, runs interleaved: median and interquartile range).

    python tools/compare_tflite_peers.py [--model builtin:reference] [--out out/tflite-peers]
        [--calib sample:32] [--per-class 10] [--qcompile-args "" "--buckets 4"]

The peers are optional (`pip install -c constraints.txt -e ".[tflite-peers]"`: litert-torch brings jax,
about 730 MB); without them only qcompile's rows are written. Peer files get qcompile's runner
metadata (signature names mapped to the ONNX input names) and nothing else. Writes peers.md and
peers.json in --out.
"""

from __future__ import annotations

import argparse
import re
import shutil
import time
from pathlib import Path

import numpy as np
from bench_tflite import side_by_side  # sibling tools (tools/ is on sys.path when run)
from compare_peers import (
    NPZ,
    describe_headline,
    float_nodes,
    headline,
    judge,
    qcompile_rows,
    wrap_as_artifact,
    write_calibration_npz,
    write_table,
)
from interleave import speedup

from qcompile.atomic import atomic_path
from qcompile.calibration.inputs import InputSet
from qcompile.graph_io import load_graph, module_path
from qcompile.manifest import Manifest
from qcompile.models.source import resolve_model
from qcompile.targets.tflite.emit import with_metadata
from qcompile.targets.tflite.runner import THREADS

COLUMNS = ("method", "float_nodes", "calibration_rows", "eps_cos_mean", "eps_sqnr_db_mean", "eps_sqnr_db_min",
           "sample_psnr_db", "sample_ssim", "accuracy_q", "frechet_q", "size_bytes", "latency", "speedup_vs_fp32",
           "xnnpack_partitions", "seconds")
PEER_SIGNATURE = "serving_default"


def litert_torch_convert(adapter, example: dict[str, np.ndarray], out: Path) -> Path:
    """The float .tflite litert-torch makes of the module qcompile exports (same inputs, batch 1)."""
    import litert_torch
    import torch

    args = tuple(torch.from_numpy(example[spec.name]) for spec in adapter.input_specs())
    litert_torch.convert(adapter.export_module().eval(), args).export(str(out))
    return out


def float_scopes(artifact: Path) -> list[str]:
    """Regexes for ai-edge-quantizer's op scopes (output tensor names, which litert-torch writes as the
    module path, `<wrapper>/<Model>_model/<Class>_<attribute>/...`) covering the top-level modules
    whose nodes qcompile kept float in `artifact`."""
    names = set(float_nodes(artifact))
    graph = load_graph(Manifest.read(artifact).fp32_path(artifact))
    tops = sorted({module_path(n).split(".")[0] for n in graph.nodes if n.name in names and module_path(n)})
    return [rf"(?:^|;)[^/;]+/[^/;]+/[^/;]*_{re.escape(top)}(?:[/;]|$)" for top in tops]


def scoped_ops(path: Path, scopes: list[str]) -> int:
    """How many operators of a .tflite have an output tensor whose name one of `scopes` matches."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    names = {d["index"]: d["name"] for d in interpreter.get_tensor_details()}
    patterns = [re.compile(s) for s in scopes]
    return sum(any(p.search(";".join(names.get(i, "") for i in op["outputs"])) for p in patterns)
               for op in interpreter._get_ops_details())  # noqa: SLF001 (the only list of operators)


def aeq_static_int8(fp32: Path, rows: list[dict[str, np.ndarray]], input_keys: dict[str, str], out: Path,
                    float_scopes: list[str] | None = None) -> Path:
    """ai-edge-quantizer's static int8 recipe, calibrated on `rows` (keyed by the peer's own input names);
    ops in `float_scopes` get its `no_quantize` algorithm (they stay float).

    Its calibrator keeps an exponential moving average (0.95) of each row's min and max, so the last
    rows decide the ranges: fed in trajectory order (t from 999 down), the timestep input ends up
    with a range of 0..105. The rows are shuffled (seeded) so that every timestep weighs alike, the
    kindest order for this peer."""
    from ai_edge_quantizer import qtyping, quantizer, recipe

    qt = quantizer.Quantizer(str(fp32))
    qt.load_quantization_recipe(recipe.static_wi8_ai8())
    for scope in float_scopes or ():
        qt.update_quantization_recipe(regex=scope, operation_name=qtyping.TFLOperationName.ALL_SUPPORTED,
                                      algorithm_key="no_quantize")
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


def batch1_rows(data: InputSet) -> list[dict[str, np.ndarray]]:
    return [data.take(slice(i, i + 1)) for i in range(data.count)]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:reference")
    ap.add_argument("--out", type=Path, default=Path("out/tflite-peers"))
    ap.add_argument("--calib", default=None, help="qcompile's --calib: the recording every method calibrates on")
    ap.add_argument("--per-class", type=int, default=10)
    ap.add_argument("--runs", type=int, default=50, help="timed runs per file (interleaved)")
    ap.add_argument("--qcompile-args", nargs="+", default=[""],
                    help="one qcompile tflite-int8 row per entry: extra build options (quoted)")
    args = ap.parse_args(argv)
    cache = args.out / "calib-cache"
    args.out.mkdir(parents=True, exist_ok=True)
    fp32_rows, fp32_dirs = qcompile_rows(args.model, args.out, cache, calib=args.calib, extras=[""],
                                         per_class=args.per_class, target="tflite-fp32")
    int8_rows, int8_dirs = qcompile_rows(args.model, args.out, cache, calib=args.calib, extras=args.qcompile_args,
                                         per_class=args.per_class, target="tflite-int8", export=fp32_dirs[0])
    rows = fp32_rows + int8_rows
    files = {r["method"]: Manifest.read(d).bucket_files(d)[0] for r, d in zip(rows, fp32_dirs + int8_dirs, strict=True)}
    ours = int8_dirs[0]
    manifest = Manifest.read(ours)
    src = manifest.source
    adapter = resolve_model(src.model, src.component, seed=src.seed)
    data = write_calibration_npz(cache, args.out / NPZ)
    try:
        import ai_edge_quantizer  # noqa: F401
        import litert_torch  # noqa: F401
    except ImportError as exc:
        print(f"[peers] litert-torch / ai-edge-quantizer not installed ({exc.name}); only qcompile's rows")
    else:
        peer_dir = args.out / "peer-litert"
        shutil.rmtree(peer_dir, ignore_errors=True)
        t0 = time.perf_counter()
        (peer_dir / "raw-fp32").mkdir(parents=True)
        feeds = batch1_rows(data)
        fp32 = litert_torch_convert(adapter, feeds[0], peer_dir / "raw-fp32" / "model.tflite")
        keys = peer_input_keys(adapter, fp32)
        peers = [("litert-torch fp32", "fp32", fp32, time.perf_counter() - t0, None)]
        scopes = float_scopes(ours)
        for like in (False, True):
            t0 = time.perf_counter()
            raw = peer_dir / f"raw-int8-{'like' if like else 'shipped'}"
            raw.mkdir(parents=True)
            path = aeq_static_int8(fp32, feeds, keys, raw / "model.tflite", scopes if like else None)
            label = "litert-torch + ai-edge-quantizer static int8, " + (
                "qcompile's float layers" if like else "as shipped")
            peers.append((label, raw.name, path, time.perf_counter() - t0, like))
        for label, name, path, seconds, like in peers:
            annotate_for_runner(adapter, path, keys)
            folder = peer_dir / name.replace("raw-", "")
            # Judged as a tflite-fp32 artifact: the same runner, and no device check (that one compares
            # qcompile's int8 tensors with the Q/DQ graph they were lowered from, which a peer has not).
            wrap_as_artifact(ours, path, folder, target="tflite-fp32")
            summary = judge(folder, adapter, manifest, args.per_class, 8)
            rows.append({**summary, "method": label, "like_for_like": like,
                         "float_nodes": scoped_ops(path, scopes) if like else (0 if like is False else None),
                         "calibration_rows": None if like is None else data.count, "seconds": round(seconds, 1)})
            files[label] = folder / path.name
    timing = side_by_side(files, THREADS, args.runs)
    base = timing[fp32_rows[0]["method"]]["timing"]
    for row in rows:
        if row["method"] in timing:
            t = timing[row["method"]]
            row.update(latency=t["text"], latency_ms=t["ms"], xnnpack_partitions=t["xnnpack_partitions"],
                       size_bytes=t["bytes"], speedup_vs_fp32=speedup(base, t["timing"]).describe())
    for t in timing.values():
        t.pop("timing")
    result = {"model": args.model, "rows": rows, "calibration_rows": data.count,
              "headline": headline(rows, int8_rows[0]["method"], "sample_psnr_db"
                                   if any(r.get("sample_psnr_db") is not None for r in rows) else "eps_sqnr_db_mean")}
    print(write_table(args.out, rows, COLUMNS, extra={"headline": result["headline"]}))
    if result["headline"]:
        print(describe_headline(result["headline"]))
    return result


if __name__ == "__main__":
    main()
