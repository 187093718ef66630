"""What moving the timestep embedding to the host is worth on a QNN target: fidelity and ranges.

    python tools/qnn_time_embedding.py --export DIR --calib-cache CACHE [--target qnn-w8a8] [--per-class 5]
        [--out out/qnn-time-embedding]

Builds the same model three times from one export and one calibration cache (no model is re-run):
the embedding on the host with the time MLP (`full`, the default), only the sinusoid on the host
(`sinusoid`), and everything on the device (`none`). For each: eps SQNR and sample PSNR (CPU EP
running the Q/DQ graph), and how much the ranges of the device graph's timestep-driven inputs move
across timesteps (largest / smallest per-timestep range width, from the cache), which is what
timestep buckets have to cover. Writes table.md and table.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnx

import qcompile.targets.qnn.target as qnn_target
from qcompile.calibration.cache import CalibrationCache
from qcompile.cli import main as qcompile_main
from qcompile.passes.host_time_embedding import TimeEmbeddingCut


def range_spread(table, names: list[str]) -> dict[str, float]:
    """Per tensor: max over timesteps of (max - min) divided by the smallest such width."""
    out = {}
    for name in names:
        stats = table.tensors.get(name)
        if stats is None:
            continue
        width = np.asarray(stats.hi, np.float64) - np.asarray(stats.lo, np.float64)
        width = width[np.isfinite(width) & (width > 0)]
        if width.size:
            out[name] = float(width.max() / width.min())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--export", type=Path, required=True, help="an artifact or export folder to reuse")
    ap.add_argument("--calib-cache", type=Path, required=True)
    ap.add_argument("--model", default="builtin:reference")
    ap.add_argument("--target", default="qnn-w8a8")
    ap.add_argument("--per-class", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("out/qnn-time-embedding"))
    args = ap.parse_args()
    table = CalibrationCache.open(args.calib_cache).table()
    rows = []
    for cut in TimeEmbeddingCut:
        qnn_target._QnnTarget.__init__.__defaults__ = (qnn_target.DEFAULT_BATCH, cut)
        out = args.out / cut.value
        qcompile_main(["build", args.model, "--target", args.target, "--out", str(out), "--calib-cache",
                       str(args.calib_cache), "--from-export", str(args.export), "--per-class", str(args.per_class),
                       "--device-samples", "0", "--min-sqnr-db", "-1000", "--min-psnr-db", "-1000"])
        report = json.loads((out / "report.json").read_text())
        model = onnx.load(str(out / "model.onnx"), load_external_data=False)
        driven = [i.name for i in model.graph.input if i.name not in ("sample", "encoder_hidden_states")]
        spread = range_spread(table, driven)
        s = report["summary"]
        rows.append({"cut": cut.value, "eps_sqnr_db_mean": s["eps_sqnr_db_mean"],
                     "eps_sqnr_db_min": s["eps_sqnr_db_min"], "sample_psnr_db": s.get("sample_psnr_db"),
                     "device_inputs": driven, "range_spread_max": max(spread.values()) if spread else None})
    lines = ["| cut | eps SQNR dB mean | eps SQNR dB min | sample PSNR dB | timestep-driven device inputs | "
             "range spread across timesteps (max) |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['cut']} | {r['eps_sqnr_db_mean']:.2f} | {r['eps_sqnr_db_min']:.2f} | {r['sample_psnr_db']:.2f} | "
              f"{len(r['device_inputs'])} | {_fmt(r['range_spread_max'])} |" for r in rows]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    (args.out / "table.json").write_text(json.dumps(rows, indent=2))
    print("\n".join(lines))


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.2f}"


if __name__ == "__main__":
    main()
