"""Cost of serving K timestep buckets from one graph, in onnxruntime CPU: a trt-* artifact built with
--buckets K holds each bucket's Q/DQ graph and the one-engine graph (constant scales, a run-time
rescale picked by a bucket input). Times both on the same inputs, and checks they agree bit for bit
node by node (the quantized tensors; see tests/test_trt_buckets.py).

    python tools/trt_bucket_cost.py ARTIFACT [--iters 30] [--batch 2]

onnxruntime is a stand-in: TensorRT's own cost (whether it fuses the rescale Div/Mul into its kernels)
can only be measured on a GPU (tools/trt_gpu_check.py).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from qcompile.manifest import Manifest
from qcompile.runtime import make_session


def timed(session, feed, iters: int) -> tuple[np.ndarray, float]:
    out = session.run(None, feed)[0]
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--batch", type=int, default=2)
    args = ap.parse_args()
    m = Manifest.read(args.artifact)
    if not m.device.get("bucket_input"):
        raise SystemExit(f"{args.artifact}: built with one bucket; rebuild with --buckets K (K > 1)")
    rng = np.random.default_rng(0)
    feed = {}
    for rec in m.model.inputs:
        shape = (args.batch, *rec.shape[1:])
        feed[rec.name] = (rng.uniform(0, m.model.timestep_scale, shape) if rec.name == m.model.timestep_input
                          else rng.standard_normal(shape)).astype(rec.dtype)
    optimize = m.target != "trt-fp8"  # onnxruntime's CPU fusions have no float8 kernels
    one = make_session(args.artifact / m.device["engine_onnx"], optimize=optimize)
    print(f"{m.target}, {len(m.buckets)} buckets, batch {args.batch}, onnxruntime optimizations "
          f"{'on' if optimize else 'off'}")
    print("| bucket | own graph ms | one-engine graph ms | ratio | max abs diff |")
    print("|---|---|---|---|---|")
    for b, path in enumerate(m.bucket_files(args.artifact)):
        own, t_own = timed(make_session(path, optimize=optimize), feed, args.iters)
        got, t_one = timed(one, {**feed, m.device["bucket_input"]: np.array([b], np.int64)}, args.iters)
        print(f"| {b} | {t_own:.2f} | {t_one:.2f} | {t_one / t_own:.3f} | {float(np.abs(own - got).max()):.3g} |")


if __name__ == "__main__":
    main()
