"""Latency of an ort-int8 artifact against its own fp32 model in onnxruntime CPU, timed side by side.

    python tools/bench_ort.py out/reference [--threads 2] [--runs 30] [--batch 2] [--json FILE]

Every bucket's model is timed (a bucketed artifact's `model_t{k}.onnx` files share one `model.data`),
each on inputs at a timestep inside its own bucket, interleaved run for run with the fp32 model on
the same inputs (tools/interleave.py): the table gives the median and interquartile range of each
side and of the paired speed-up. Inputs are the model's synthetic inputs (latency does not depend on
the values). Sizes: every file the runner reads, shared weights counted once.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from interleave import interleaved, speedup  # the sibling tools module (tools/ is on sys.path when run)

from qcompile.artifact import files_size
from qcompile.manifest import Manifest
from qcompile.models.source import resolve_model
from qcompile.runtime import make_session


def bucket_timestep(manifest: Manifest, index: int) -> float | None:
    """A timestep bucket `index` serves: the middle of its calibrated timesteps, else of its range."""
    if manifest.model.timestep_input is None:
        return None
    b = manifest.buckets[index]
    if b.calibration_timesteps:
        return float(sorted(b.calibration_timesteps)[len(b.calibration_timesteps) // 2])
    return (b.timestep_range[0] + b.timestep_range[1]) / 2


def bucket_feed(adapter, manifest: Manifest, index: int, batch: int) -> dict[str, np.ndarray]:
    t = bucket_timestep(manifest, index)
    return adapter.synthetic_inputs(np.full(batch, 0.0 if t is None else t, np.float32), seed=index)


def bench(folder: Path, *, threads: int, runs: int, batch: int) -> list[dict]:
    """One row per bucket: fp32 and int8 timings on the same inputs, sizes, speed-up."""
    manifest = Manifest.read(folder)
    if manifest.target != "ort-int8":
        raise SystemExit(f"{folder}: a {manifest.target} artifact; bench_ort.py times ort-int8 artifacts")
    src = manifest.source
    adapter = resolve_model(src.model, src.component, seed=src.seed)
    fp32_path = manifest.fp32_path(folder)
    fp32 = make_session(fp32_path, threads=threads)
    fp32_bytes = files_size(fp32_path.parent, [fp32_path.name, fp32_path.name + ".data"])
    int8_bytes = files_size(folder, manifest.runtime_files())
    rows = []
    for index, path in enumerate(manifest.bucket_files(folder)):
        sess = make_session(path, threads=threads)
        feed = bucket_feed(adapter, manifest, index, batch)
        feed = {i.name: feed[i.name] for i in sess.get_inputs()}
        t = interleaved({"fp32": lambda f=feed: fp32.run(None, f), "int8": lambda s=sess, f=feed: s.run(None, f)},
                        runs=runs)
        rows.append({"model": src.model, "bucket": index, "timestep": bucket_timestep(manifest, index),
                     "batch": batch, "threads": threads, "fp32": t["fp32"].as_dict(), "int8": t["int8"].as_dict(),
                     **speedup(t["fp32"], t["int8"]).as_dict(), "fp32_bytes": fp32_bytes, "int8_bytes": int8_bytes,
                     "buckets": len(manifest.buckets), "text": {k: v.describe() for k, v in t.items()}
                     | {"speedup": speedup(t["fp32"], t["int8"]).describe()}})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | bucket | batch | fp32 ms, median (IQR) | int8 ms, median (IQR) | speed-up (IQR) "
             "| fp32 MB | int8 MB, all buckets |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['bucket']} of {r['buckets']} | {r['batch']} | {r['text']['fp32']} | "
                     f"{r['text']['int8']} | {r['text']['speedup']} | {r['fp32_bytes'] / 1e6:.2f} | "
                     f"{r['int8_bytes'] / 1e6:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    rows = bench(args.artifact, threads=args.threads, runs=args.runs, batch=args.batch)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    else:
        json.dump(rows, sys.stdout)
        print()


if __name__ == "__main__":
    main()
