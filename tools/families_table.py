"""Build every built-in tiny family for a target and write a markdown table of the results.

    python tools/families_table.py [--target ort-int8] [--out out/families] [--calib synthetic:16]

Part of `python tools/results.py` (docs/results.md).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from qcompile.config import CalibSpec, CompileConfig, TargetName, Thresholds
from qcompile.stages import build

FAMILIES = (
    "builtin:tiny-unet2d", "builtin:tiny-sd-unet", "builtin:tiny-sdxl-unet", "builtin:tiny-dit",
    "builtin:tiny-pixart", "builtin:tiny-sd3", "builtin:tiny-flux", "builtin:tiny-vae-decoder",
    "builtin:tiny-vae-encoder", "builtin:tiny-clip-text",
)


def family_row(model: str, target: str, calib: str, out: Path) -> dict:
    """Build `model` for `target` and summarise the build in one row."""
    t0 = time.perf_counter()
    cfg = CompileConfig(model=model, target=TargetName.parse(target), calib=CalibSpec.parse(calib),
                        out_dir=out / model.split(":")[1], thresholds=Thresholds(eps_sqnr_db_mean=None))
    result = build(cfg)
    s, m = result.report["summary"], result.manifest
    row = {"model": model, "class": m.source.class_name, "exporter": m.export.exporter,
           "export_max_abs_diff": m.export.max_abs_diff_vs_torch,
           "eps_cos_mean": s["eps_cos_mean"], "eps_cos_min": s["eps_cos_min"],
           "eps_sqnr_db_mean": s["eps_sqnr_db_mean"], "eps_sqnr_db_min": s["eps_sqnr_db_min"],
           "size_ratio": s["size_ratio"], "float_layers": len(m.quantization.float_layers),
           "passed": result.passed, "seconds": round(time.perf_counter() - t0, 1),
           **{k: s[k] for k in ("htp_cosine_min", "htp_vs_fp32_sqnr_db_min", "htp_vs_cpu_ep_sqnr_db_min") if k in s}}
    if "device" in result.report:
        row["device_checks"] = result.report["device"]["checks"]
    return row


def tables(rows: list[dict]) -> str:
    lines = ["| model | class | exporter | export max abs diff | eps cos mean (min) | eps SQNR dB mean (min) "
             "| size vs fp32 | float layers | build s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['class']} | {r['exporter']} | {r['export_max_abs_diff']:.1e} | "
                     f"{r['eps_cos_mean']:.4f} ({r['eps_cos_min']:.4f}) | {r['eps_sqnr_db_mean']:.1f} "
                     f"({r['eps_sqnr_db_min']:.1f}) | {r['size_ratio']:.3f} | {r['float_layers']} | {r['seconds']} |")
    device = [r for r in rows if "htp_cosine_min" in r]
    if device:  # targets proven on a device simulator (qnn-*)
        lines += ["", "| model | on HTP: cosine min | SQNR vs fp32 dB | SQNR vs CPU EP dB | checks passed |",
                  "|---|---|---|---|---|"]
        for r in device:
            passed = ", ".join(k for k, ok in r["device_checks"].items() if ok)
            lines.append(f"| {r['model']} | {r['htp_cosine_min']:.5f} | {r['htp_vs_fp32_sqnr_db_min']:.1f} | "
                         f"{r['htp_vs_cpu_ep_sqnr_db_min']:.1f} | {passed} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="ort-int8")
    ap.add_argument("--out", type=Path, default=Path("out/families"))
    ap.add_argument("--calib", default="synthetic:16")
    ap.add_argument("--only", nargs="*", default=None)
    args = ap.parse_args(argv)
    rows = [family_row(model, args.target, args.calib, args.out) for model in args.only or FAMILIES]
    print(tables(rows))
    (args.out / "families.json").write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
