"""Ablation of timestep buckets x estimators, with and without --full-integer, on one model.

    python tools/ablate_buckets.py [--model builtin:reference] [--out out/ablation] [--buckets 1 2 4 8]
        [--estimators max percentile mse entropy] [--calib sample:32]

Calibrates once (one cache) and exports once; every other build reuses both, so each row costs only
quantization and evaluation. Writes out/ablation/ablation.md and ablation.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from qcompile.config import BucketMethod, CalibSpec, CompileConfig, Estimator, TargetName, Thresholds
from qcompile.stages import build

COLUMNS = ("full_integer", "buckets", "estimator", "eps_sqnr_db_min", "eps_sqnr_db_mean", "sample_psnr_db",
           "sample_ssim", "frechet_q", "accuracy_q", "size_bytes", "build_seconds")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:reference")
    ap.add_argument("--target", default="ort-int8")
    ap.add_argument("--out", type=Path, default=Path("out/ablation"))
    ap.add_argument("--buckets", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--estimators", nargs="+", default=[e.value for e in Estimator])
    ap.add_argument("--calib", default=None)
    ap.add_argument("--bucket-method", default="data")
    ap.add_argument("--modes", nargs="+", default=["full-integer", "default"])
    args = ap.parse_args()
    cache = args.out / "calib-cache"
    rows, export_from = [], None
    for mode in args.modes:
        for k in args.buckets:
            for est in args.estimators:
                name = f"{mode}-k{k}-{est}"
                t0 = time.perf_counter()
                cfg = CompileConfig(model=args.model, target=TargetName.parse(args.target), out_dir=args.out / name,
                                    calib=CalibSpec.parse(args.calib) if args.calib else None, calib_cache=cache,
                                    export_from=export_from, estimator=Estimator.parse(est), buckets=k,
                                    bucket_method=BucketMethod.parse(args.bucket_method),
                                    full_integer=mode == "full-integer", thresholds=Thresholds(eps_sqnr_db_mean=None))
                result = build(cfg)
                export_from = export_from or result.out_dir
                s = result.report["summary"]
                row = {"full_integer": mode == "full-integer", "buckets": k, "estimator": est,
                       **{c: s.get(c) for c in COLUMNS[3:-1]}, "build_seconds": round(time.perf_counter() - t0, 1)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r[c]) for c in COLUMNS) + " |")
    (args.out / "ablation.md").write_text("\n".join(lines) + "\n")
    (args.out / "ablation.json").write_text(json.dumps(rows, indent=2))
    print("\n".join(lines))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.2f}"
    return str(v)


if __name__ == "__main__":
    main()
