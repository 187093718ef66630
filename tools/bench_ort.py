"""Latency of an ort-int8 artifact against its own fp32 model, side by side, in onnxruntime CPU.

    python tools/bench_ort.py out/reference [--threads 2] [--runs 30] [--batch 2]

Inputs are random arrays of the manifest's input shapes (latency does not depend on values).
Prints a markdown row: fp32 ms, int8 ms, speed-up, file sizes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from qcompile.artifact import read_manifest
from qcompile.runtime import make_session


def median_ms(path: Path, feed: dict[str, np.ndarray], threads: int, runs: int) -> float:
    sess = make_session(path, threads=threads)
    for _ in range(3):
        sess.run(None, feed)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def make_feed(manifest: dict, batch: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feed = {}
    for spec in manifest["model"]["inputs"]:
        shape = (batch, *spec["shape"][1:]) if spec.get("batched", True) else tuple(spec["shape"])
        if spec["dtype"] == "int64":
            feed[spec["name"]] = rng.integers(0, 10, shape).astype(np.int64)
        elif spec["role"] == "timestep":
            feed[spec["name"]] = rng.uniform(0, manifest["model"]["timestep_scale"], shape).astype(np.float32)
        else:
            feed[spec["name"]] = rng.standard_normal(shape).astype(np.float32)
    return feed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--batch", type=int, default=2)
    args = ap.parse_args()
    m = read_manifest(args.artifact)
    fp32 = args.artifact / m["source"]["fp32_model"]
    quant = args.artifact / m["buckets"][0]["files"][0]
    feed = make_feed(m, args.batch)
    t_fp32 = median_ms(fp32, feed, args.threads, args.runs)
    t_q = median_ms(quant, feed, args.threads, args.runs)
    size = lambda p: p.stat().st_size + p.with_name(p.name + ".data").stat().st_size  # noqa: E731
    row = {"model": m["source"]["model"], "batch": args.batch, "threads": args.threads,
           "fp32_ms": round(t_fp32, 3), "int8_ms": round(t_q, 3), "speedup": round(t_fp32 / t_q, 3),
           "fp32_bytes": size(fp32), "int8_bytes": size(quant)}
    print("| model | batch | fp32 ms | int8 ms | speed-up | fp32 MB | int8 MB |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {row['model']} | {args.batch} | {t_fp32:.2f} | {t_q:.2f} | {t_fp32 / t_q:.2f}x | "
          f"{row['fp32_bytes'] / 1e6:.2f} | {row['int8_bytes'] / 1e6:.2f} |")
    print(json.dumps(row))


if __name__ == "__main__":
    main()
