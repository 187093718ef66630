"""TFLite latency: int8 against fp32 artifacts of the same model, side by side in the LiteRT
interpreter (XNNPACK delegate, 2 threads, at least 20 interleaved runs: median and interquartile
range, tools/interleave.py), and file sizes.

    qcompile build builtin:reference --target tflite-int8 --out out/ref-tflite-int8
    qcompile build builtin:reference --target tflite-fp32 --out out/ref-tflite-fp32
    python tools/bench_tflite.py out/ref-tflite-fp32 out/ref-tflite-int8 [--runs 30]

The two interpreters are called alternately, run for run, so that load from other processes on a
shared machine hits both alike. A bucketed file is timed on its first bucket's signature (every
bucket's subgraph has the same operators). The table also gives what explains a speed-up or its absence: the
number of XNNPACK partitions (each boundary is a hand-over between the delegate and TFLite's own
kernels) and the operator count.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from interleave import interleaved, speedup  # the sibling tools module (tools/ is on sys.path when run)

from qcompile.manifest import Manifest


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

    def once(self) -> None:
        self.runner(**self.feed)

    def row(self, timing) -> dict:
        ops = self.interpreter._get_ops_details()  # noqa: SLF001 (the only view of the delegated plan)
        return {"ms": round(timing.median_ms, 3), **timing.as_dict(), "text": timing.describe(),
                "bytes": self.path.stat().st_size,
                "batch": next(iter(self.feed.values())).shape[0],
                "xnnpack_partitions": sum(op["op_name"] == "DELEGATE" for op in ops),
                "operators": sum(op["op_name"] != "DELEGATE" for op in ops)}


def side_by_side(paths: dict[str, Path], threads: int, runs: int, warmup: int = 5) -> dict[str, dict]:
    """Each file's row (median, spread, size, partitions), all timed in one interleaved loop; the
    per-round timings stay under "timing" for paired speed-ups."""
    timed = {label: Timed(path, threads) for label, path in paths.items()}
    timings = interleaved({label: t.once for label, t in timed.items()}, runs=runs, warmup=warmup)
    return {label: {**t.row(timings[label]), "timing": timings[label]} for label, t in timed.items()}


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
        paths[label] = Manifest.read(folder).bucket_files(folder)[0]
    rows = side_by_side(paths, args.threads, args.runs)
    speed = speedup(rows["fp32"].pop("timing"), rows["int8"].pop("timing"))
    fp, q = rows["fp32"], rows["int8"]
    print("| model | batch | fp32 ms, median (IQR) | int8 ms, median (IQR) | speed-up (IQR) | fp32 MB | int8 MB "
          "| XNNPACK partitions fp32 / int8 | operators fp32 / int8 |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {Manifest.read(args.int8).source.model} | {q['batch']} | {fp['text']} | {q['text']} | "
          f"{speed.describe()} | {fp['bytes'] / 1e6:.2f} | {q['bytes'] / 1e6:.2f} | "
          f"{fp['xnnpack_partitions']} / {q['xnnpack_partitions']} | {fp['operators']} / {q['operators']} |")
    print(json.dumps({**rows, **speed.as_dict(), "threads": args.threads, "runs": args.runs}))


if __name__ == "__main__":
    main()
