"""W8A8 on the NPU, side by side: what buckets, bias correction and per-bucket mixed precision buy.

    python tools/w8a8_table.py --export E --calib-cache C [--per-class 20] [--rows k1 k4 ...]
        [--target-sqnr 40] [--target-cfg-gap 0.5] [--max-layers 16] [--candidates 16]
        [--out out/w8a8-table]

Builds, from one float export and one calibration cache (no model run for calibration), the rows
  k1        qnn-w8a8, one bucket
  k4        qnn-w8a8, 4 buckets
  k4-bc     qnn-w8a8, 4 buckets, --bias-correction
  k4-mp     qnn-w8a8, 4 buckets, --mixed-precision-per-bucket with the targets given here
  k4-mp1    qnn-w8a8, 4 buckets, per bucket exactly its one most sensitive layer raised (of 4 measured)
  w8a16     qnn-w8a16, one bucket
Any bucket count can replace the 4 (`k20`, `k20-mp1`: with DDIM 20 steps, one bucket per step).
A row may name its activation range estimator after a colon (`k4:mse`, `k4-mp1:percentile`; max
otherwise, the build's default): each bucket's ranges then come from that estimator over the
bucket's own timesteps; its folder is `k4-mse`. The rows are built in the order given and
evaluates each on onnxruntime's CPU EP running the HTP's Q/DQ graphs (what the build's evaluation
runs) over the same paired images (10 classes x --per-class, DDIM 20 steps, guidance 2.5): mean
sample PSNR against fp32 (free sampling from the same noise), the CFG-gap ratio per step (teacher
forced on the float trajectories; the max over steps), and the fraction of activation bytes and of
MACs at 16 bits (the manifest's per-bucket record; mean over buckets, and the largest bucket).
Writes table.md and table.json (with every image's PSNR).
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import numpy as np

from qcompile import api
from qcompile.config import Estimator, FidelitySettings, TargetName, Thresholds
from qcompile.evaluation.fidelity import evaluate_sampling
from qcompile.evaluation.metrics import psnr_db
from qcompile.manifest import Manifest
from qcompile.models.source import resolve_model
from qcompile.runtime import OnnxRunner
from qcompile.target import load_target

ROWS = ("k1", "k4", "k4-bc", "k4-mp", "k4-mp1", "w8a16")
ROW = re.compile(r"k([1-9][0-9]*)(-bc|-mp|-mp1)?|w8a16")
ESTIMATORS = tuple(e.value for e in Estimator)


def row_name(text: str) -> str:
    """`row` or `row:estimator`, checked against ROW and the estimators (argparse type)."""
    row, _, estimator = text.partition(":")
    if not ROW.fullmatch(row) or (estimator and estimator not in ESTIMATORS):
        raise argparse.ArgumentTypeError(f"{text!r}: a row is one of {', '.join(ROWS)} (any bucket count for the "
                                         f"4), optionally followed by :estimator ({', '.join(ESTIMATORS)})")
    return text


def settings_of(name: str, args: argparse.Namespace) -> dict:
    row, _, estimator = name.partition(":")
    settings = _row_settings(row, args)
    return {**settings, "estimator": estimator} if estimator else settings


def _row_settings(row: str, args: argparse.Namespace) -> dict:
    if row == "w8a16":
        return {"target": "qnn-w8a16", "buckets": 1}
    buckets, variant = ROW.fullmatch(row).groups()
    base = {"target": "qnn-w8a8", "buckets": int(buckets)}
    if variant == "-bc":
        return {**base, "bias_correction": True}
    if variant == "-mp":
        return {**base, "mixed_precision_per_bucket": True, "mixed_precision_sqnr_db": args.target_sqnr,
                "mixed_precision_cfg_gap": args.target_cfg_gap, "max_float_layers": args.max_layers,
                "mixed_precision_candidates": args.candidates}
    if variant == "-mp1":
        return {**base, "mixed_precision_per_bucket": True, "max_float_layers": 1, "mixed_precision_candidates": 4}
    return base


def build(row: str, args: argparse.Namespace) -> tuple[Path, float]:
    out = args.out / row.replace(":", "-")
    if (out / "manifest.json").is_file():
        return out, 0.0
    t0 = time.perf_counter()
    # The build's own evaluation is kept short (one image per class, no device sampling): this tool
    # evaluates every artifact on the same images below.
    fidelity = FidelitySettings(per_class=1, device_samples=0)
    result = api.build("builtin:reference", out, export_from=args.export, calib_cache=args.calib_cache,
                       fidelity=fidelity, thresholds=Thresholds(sample_psnr_db=None, eps_sqnr_db_mean=None),
                       **settings_of(row, args))
    if not result.passed:  # a missed mixed-precision target is recorded, not hidden
        failed = out.with_name(out.name + ".failed")
        failed.rename(out)
    return out, time.perf_counter() - t0


def fractions(manifest: Manifest) -> dict[str, float]:
    """16-bit shares; the records count what is wider than the target's own width, so W8A16 is all 16-bit."""
    if manifest.precision == "w8a16":
        return {"wide_act_bytes_mean": 1.0, "wide_act_bytes_max": 1.0, "wide_macs_mean": 1.0,
                "layers_raised": ["all"]}
    recs = [b.precision or {} for b in manifest.buckets]
    act = [r.get("wide_activation_bytes_fraction", 0.0) for r in recs]
    mac = [r.get("wide_mac_fraction", 0.0) for r in recs]
    return {"wide_act_bytes_mean": round(float(np.mean(act)), 4), "wide_act_bytes_max": round(float(np.max(act)), 4),
            "wide_macs_mean": round(float(np.mean(mac)), 4), "layers_raised": [len(r.get("layers", ())) for r in recs]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--export", type=Path, required=True)
    ap.add_argument("--calib-cache", type=Path, required=True)
    ap.add_argument("--rows", nargs="+", type=row_name, default=list(ROWS),
                    help="rows, each optionally with :estimator (k4:mse)")
    ap.add_argument("--per-class", type=int, default=20, help="images per class (10 classes)")
    ap.add_argument("--target-sqnr", type=float, default=None, help="k4-mp: per-bucket probe SQNR target (dB)")
    ap.add_argument("--target-cfg-gap", type=float, default=None, help="k4-mp: per-bucket CFG-gap target")
    ap.add_argument("--max-layers", type=int, default=16, help="k4-mp: most layers raised per bucket")
    ap.add_argument("--candidates", type=int, default=16, help="k4-mp: layers measured per bucket")
    ap.add_argument("--out", type=Path, default=Path("out/w8a8-table"))
    args = ap.parse_args()
    if args.target_sqnr is None and args.target_cfg_gap is None:
        args.target_sqnr = 40.0
    args.out.mkdir(parents=True, exist_ok=True)
    rows, base = [], None
    for name in args.rows:
        folder, build_s = build(name, args)
        manifest = Manifest.read(folder)
        model = manifest.model
        adapter = resolve_model(manifest.source.model, manifest.source.component, seed=manifest.source.seed)
        reference = OnnxRunner([manifest.fp32_path(folder)], timestep_name=model.timestep_input,
                               sample_name=model.sample_input)
        runner = load_target(TargetName.parse(manifest.target)).runner(folder, manifest)
        t0 = time.perf_counter()
        result = evaluate_sampling(reference, runner, adapter.sampling(), FidelitySettings(per_class=args.per_class),
                                   sample_name=model.sample_input, timestep_name=model.timestep_input,
                                   bucket_of=runner.bucket_of)
        per_image = np.array([psnr_db(a, b) for a, b in zip(result.images_fp32, result.images_q, strict=True)])
        gaps = [(s.timestep, s.cfg_gap_ratio) for s in result.steps if s.cfg_gap_ratio is not None]
        worst: dict[float, float] = {}
        for t, g in gaps:
            worst[t] = max(worst.get(t, 0.0), g)
        row = {"row": name, "target": manifest.target, "estimator": manifest.calibration.estimator,
               "buckets": len(manifest.buckets),
               "sample_psnr_db": round(float(per_image.mean()), 3), "images": len(per_image),
               "cfg_gap_max": round(max(worst.values()), 3), "steps_gap_over_1": sum(g > 1 for g in worst.values()),
               **fractions(manifest), "build_s": round(build_s, 1), "eval_s": round(time.perf_counter() - t0, 1),
               "_per_image": per_image}
        if base is None:
            base = row
        diff = per_image - base["_per_image"]
        row["gain_vs_first_db"] = round(float(diff.mean()), 3)
        row["gain_stderr_db"] = round(float(diff.std() / np.sqrt(len(diff))), 3)
        rows.append(row)
        print({k: v for k, v in row.items() if not k.startswith("_")}, flush=True)
    cols = ["row", "target", "estimator", "buckets", "sample_psnr_db", "gain_vs_first_db", "gain_stderr_db",
            "cfg_gap_max", "steps_gap_over_1", "wide_act_bytes_mean", "wide_act_bytes_max", "wide_macs_mean",
            "layers_raised"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    (args.out / "table.md").write_text("\n".join(lines) + f"\n\n{rows[0]['images']} paired images, CPU EP\n")
    (args.out / "table.json").write_text(json.dumps(
        [{k.lstrip("_"): [round(float(x), 3) for x in v] if k.startswith("_") else v for k, v in r.items()}
         for r in rows], indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
