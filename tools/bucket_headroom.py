"""How much can timestep buckets gain on a model? The per-step error budget, from a calibration cache.

    python tools/bucket_headroom.py --export DIR --calib-cache CACHE [--model builtin:reference]
        [--estimator max] [--full-integer] [--buckets 4] [--rows-per-step 64] [--out out/bucket-headroom]

Buckets can only remove error that comes from a timestep's activations being quantized with ranges
taken over other timesteps. This measures, for every recorded timestep, on the recorded rows of that
timestep (the raw prediction, both CFG halves), the output SQNR against the float model of:
  - K=1: one range set over all timesteps (the classic static scale);
  - K buckets with the build's data-driven edges;
  - per-timestep ranges (every timestep its own statistics): no bucketing of these timesteps can
    do better with this estimator, so this is the headroom;
  - weights only (every activation float): the error no activation range can remove.
If the per-timestep column sits close to K=1, buckets cannot pay on this model, whatever the edges.
Target: ort-int8 (one Q/DQ ONNX per bucket, run in onnxruntime). Writes table.md, table.json and
headroom.png (SQNR against timestep).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from qcompile.calibration.buckets import choose_buckets
from qcompile.calibration.cache import CalibrationCache
from qcompile.calibration.calibrate import graph_fingerprint
from qcompile.calibration.estimators import estimate_ranges
from qcompile.config import BucketMethod, CompileConfig, Estimator, TargetName
from qcompile.evaluation.metrics import sqnr_db
from qcompile.graph_io import load_graph
from qcompile.pass_manager import PassContext, PassManager
from qcompile.passes.insert_qdq import plan_quantization
from qcompile.runtime import OnnxRunner
from qcompile.stages import FP32_DIR, exclusions, resolve
from qcompile.target import load_target

BATCH = 64


def rows_by_timestep(cache: CalibrationCache, per_step: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Up to `per_step` recorded rows of every timestep (a recording holds both CFG halves per call)."""
    taken: dict[float, int] = {}
    parts: list[dict[str, np.ndarray]] = []
    for inputs, meta in cache.recording().shards():
        keep = []
        for i, t in enumerate(meta.timestep):
            if taken.get(float(t), 0) < per_step:
                taken[float(t)] = taken.get(float(t), 0) + 1
                keep.append(i)
        if keep:
            parts.append({**inputs.take(np.array(keep)), "_t": meta.timestep[keep]})
    feeds = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return feeds, feeds.pop("_t")


def run(path: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    runner = OnnxRunner([path])
    count = len(next(iter(feeds.values())))
    return np.concatenate([runner.run({k: v[i:i + BATCH] for k, v in feeds.items()}) for i in range(0, count, BATCH)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--export", type=Path, required=True, help="an artifact or export folder (its fp32/model.onnx)")
    ap.add_argument("--calib-cache", type=Path, required=True)
    ap.add_argument("--model", default="builtin:reference")
    ap.add_argument("--estimator", default="max")
    ap.add_argument("--full-integer", action="store_true")
    ap.add_argument("--buckets", type=int, default=4)
    ap.add_argument("--rows-per-step", type=int, default=64)
    ap.add_argument("--out", type=Path, default=Path("out/bucket-headroom"))
    args = ap.parse_args()
    fp32 = args.export / FP32_DIR / "model.onnx"
    cache = CalibrationCache.open(args.calib_cache, expect_graph=graph_fingerprint(fp32))
    table, estimator = cache.table(), Estimator.parse(args.estimator)
    target = load_target(TargetName.ORT_INT8)
    cfg = CompileConfig(model=args.model, target=TargetName.ORT_INT8, out_dir=args.out, full_integer=args.full_integer)
    adapter = resolve(cfg)
    excluded = exclusions(cfg, adapter, target.caps)
    names = plan_quantization(load_graph(fp32), target.caps, excluded).activations
    levels = target.caps.activation_dtype.qmax - target.caps.activation_dtype.qmin
    feeds, row_t = rows_by_timestep(cache, args.rows_per_step)
    reference = run(fp32, feeds)
    with tempfile.TemporaryDirectory(prefix="qcompile-headroom-") as folder:
        tmp = Path(folder)

        def quantized(ranges, tag: str) -> Path:
            """The Q/DQ graph with these activation ranges (none: weights only)."""
            graph = load_graph(fp32)
            plan = plan_quantization(graph, target.caps, excluded)
            PassManager(target.pipeline(plan, ranges)).run(graph, PassContext())
            (tmp / tag).mkdir()
            return tmp / tag / target.emit([graph], tmp / tag)[0][0]

        def ranges_of(idx):
            return estimate_ranges(table, estimator, idx, names=names, levels=levels,
                                   symmetric=target.caps.activation_symmetric)

        def per_step(outputs: dict[float, np.ndarray]) -> dict[float, float]:
            return {t: sqnr_db(reference[row_t == t], outputs[t]) for t in outputs}

        steps = [float(t) for t in table.timesteps]
        whole = run(quantized(ranges_of(None), "k1"), feeds)
        weights = run(quantized({}, "weights"), feeds)
        columns = {"k1": per_step({t: whole[row_t == t] for t in steps}),
                   "weights_only": per_step({t: weights[row_t == t] for t in steps})}
        buckets = choose_buckets(table, args.buckets, BucketMethod.DATA, timestep_scale=adapter.timestep_scale)
        bucketed, oracle = {}, {}
        for b in buckets:
            path = quantized(ranges_of(b.timestep_indices), f"b{b.index}")
            for i in b.timestep_indices:
                bucketed[steps[i]] = run(path, {k: v[row_t == steps[i]] for k, v in feeds.items()})
        for i, t in enumerate(steps):
            oracle[t] = run(quantized(ranges_of([i]), f"t{i}"), {k: v[row_t == t] for k, v in feeds.items()})
        columns[f"k{len(buckets)}"] = per_step(bucketed)
        columns["per_timestep"] = per_step(oracle)
        write(args, steps, columns, [b.timestep_range for b in buckets])


def write(args, steps: list[float], columns: dict[str, dict[float, float]], edges) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    keys = list(columns)
    lines = ["| timestep | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 1)]
    for t in steps:
        lines.append(f"| {t:.0f} | " + " | ".join(f"{columns[k][t]:.2f}" for k in keys) + " |")
    means = {k: float(np.mean(list(columns[k].values()))) for k in keys}
    lines.append("| mean | " + " | ".join(f"{means[k]:.2f}" for k in keys) + " |")
    text = "\n".join(lines) + (f"\n\nraw eps SQNR dB vs fp32 per recorded timestep; estimator {args.estimator}, "
                               f"full integer {args.full_integer}, bucket ranges {edges}\n")
    (args.out / "table.md").write_text(text)
    (args.out / "table.json").write_text(json.dumps({"columns": {k: {str(t): v for t, v in c.items()}
                                                                 for k, c in columns.items()},
                                                     "means": means, "bucket_ranges": edges}, indent=2))
    print(text)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for k in keys:
        ax.plot(steps, [columns[k][t] for t in steps], marker="o", ms=3, label=f"{k} (mean {means[k]:.2f})")
    ax.set_xlabel("timestep")
    ax.set_ylabel("eps SQNR vs fp32 (dB)")
    ax.set_title(f"bucket headroom: {args.estimator}, full integer {args.full_integer}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "headroom.png", dpi=100)


if __name__ == "__main__":
    main()
