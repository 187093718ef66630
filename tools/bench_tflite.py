"""TFLite latency: int8 against fp32 artifacts of the same model, side by side in the LiteRT
interpreter (XNNPACK delegate, 2 threads, median of at least 20 runs), and file sizes.

    qcompile build builtin:reference --target tflite-int8 --out out/ref-tflite-int8
    qcompile build builtin:reference --target tflite-fp32 --out out/ref-tflite-fp32
    python tools/bench_tflite.py out/ref-tflite-fp32 out/ref-tflite-int8 [--runs 30]

The two interpreters are called alternately, run for run, so that load from other processes on a
shared machine hits both alike. The table also gives what explains a speed-up or its absence: the
number of XNNPACK partitions (each boundary is a hand-over between the delegate and TFLite's own
kernels) and the operator count.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from qcompile.artifact import read_manifest


class Timed:
    """One interpreter on the first signature of a .tflite file, fed fixed random inputs."""

    def __init__(self, path: Path, threads: int):
        from ai_edge_litert.interpreter import Interpreter

        self.path = path
        self.interpreter = Interpreter(model_path=str(path), num_threads=threads)
        self.runner = self.interpreter.get_signature_runner(next(iter(self.interpreter.get_signature_list())))
        rng = np.random.default_rng(0)
        self.feed = {name: (rng.standard_normal(d["shape"]).astype(d["dtype"]) if np.dtype(d["dtype"]).kind == "f"
                            else np.zeros(d["shape"], d["dtype"]))
                     for name, d in self.runner.get_input_details().items()}
        self.times: list[float] = []

    def once(self) -> float:
        t0 = time.perf_counter()
        self.runner(**self.feed)
        return (time.perf_counter() - t0) * 1e3

    def row(self) -> dict:
        ops = self.interpreter._get_ops_details()  # noqa: SLF001 (the only view of the delegated plan)
        return {"ms": round(statistics.median(self.times), 3), "bytes": self.path.stat().st_size,
                "batch": next(iter(self.feed.values())).shape[0],
                "xnnpack_partitions": sum(op["op_name"] == "DELEGATE" for op in ops),
                "operators": sum(op["op_name"] != "DELEGATE" for op in ops)}


def side_by_side(paths: dict[str, Path], threads: int, runs: int, warmup: int = 5) -> dict[str, dict]:
    timed = {label: Timed(path, threads) for label, path in paths.items()}
    for _ in range(warmup):
        for t in timed.values():
            t.once()
    for _ in range(runs):
        for t in timed.values():
            t.times.append(t.once())
    return {label: t.row() for label, t in timed.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("fp32", type=Path)
    ap.add_argument("int8", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=30)
    args = ap.parse_args()
    if args.runs < 20:
        ap.error("--runs: at least 20")
    paths = {}
    for label, folder in (("fp32", args.fp32), ("int8", args.int8)):
        paths[label] = folder / read_manifest(folder)["buckets"][0]["files"][0]
    rows = side_by_side(paths, args.threads, args.runs)
    speed = rows["fp32"]["ms"] / rows["int8"]["ms"]
    fp, q = rows["fp32"], rows["int8"]
    print("| model | batch | fp32 ms | int8 ms | speed-up | fp32 MB | int8 MB | XNNPACK partitions fp32 / int8 | "
          "operators fp32 / int8 |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {read_manifest(args.int8)['source']['model']} | {q['batch']} | {fp['ms']:.3f} | {q['ms']:.3f} | "
          f"{speed:.2f}x | {fp['bytes'] / 1e6:.2f} | {q['bytes'] / 1e6:.2f} | "
          f"{fp['xnnpack_partitions']} / {q['xnnpack_partitions']} | {fp['operators']} / {q['operators']} |")
    print(json.dumps({**rows, "speedup": round(speed, 3), "threads": args.threads, "runs": args.runs}))


if __name__ == "__main__":
    main()
