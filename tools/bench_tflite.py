"""TFLite latency: int8 against fp32 artifacts of the same model, side by side in the LiteRT
interpreter (XNNPACK delegate, 2 threads, median of at least 20 runs), and file sizes.

    qcompile build builtin:reference --target tflite-int8 --out out/ref-tflite-int8
    qcompile build builtin:reference --target tflite-fp32 --out out/ref-tflite-fp32
    python tools/bench_tflite.py out/ref-tflite-fp32 out/ref-tflite-int8 [--runs 30]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from qcompile.artifact import read_manifest


def median_ms(path: Path, threads: int, runs: int) -> tuple[float, int]:
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(path), num_threads=threads)
    runner = interp.get_signature_runner(next(iter(interp.get_signature_list())))
    rng = np.random.default_rng(0)
    feed = {name: (rng.standard_normal(d["shape"]).astype(d["dtype"]) if np.dtype(d["dtype"]).kind == "f"
                   else np.zeros(d["shape"], d["dtype"]))
            for name, d in runner.get_input_details().items()}
    for _ in range(3):
        runner(**feed)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        runner(**feed)
        times.append((time.perf_counter() - t0) * 1e3)
    batch = next(iter(feed.values())).shape[0]
    return statistics.median(times), batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("fp32", type=Path)
    ap.add_argument("int8", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=30)
    args = ap.parse_args()
    rows = {}
    for label, folder in (("fp32", args.fp32), ("int8", args.int8)):
        m = read_manifest(folder)
        path = folder / m["buckets"][0]["files"][0]
        ms, batch = median_ms(path, args.threads, args.runs)
        rows[label] = {"ms": round(ms, 3), "bytes": path.stat().st_size, "batch": batch}
    speed = rows["fp32"]["ms"] / rows["int8"]["ms"]
    print("| model | batch | fp32 ms | int8 ms | speed-up | fp32 MB | int8 MB |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {read_manifest(args.int8)['source']['model']} | {rows['int8']['batch']} | {rows['fp32']['ms']:.3f} | "
          f"{rows['int8']['ms']:.3f} | {speed:.2f}x | {rows['fp32']['bytes'] / 1e6:.2f} | "
          f"{rows['int8']['bytes'] / 1e6:.2f} |")
    print(json.dumps({**rows, "speedup": round(speed, 3), "threads": args.threads, "runs": args.runs}))


if __name__ == "__main__":
    main()
