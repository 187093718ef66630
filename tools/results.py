"""Regenerate the published evidence: every table in docs/results.md (and its raw data in
docs/results.json) from one command.

    python tools/results.py [--quick] [--out out/results] [--docs docs] [--only SECTION ...]

Sections, in order: the tiny families on ort-int8; the trained reference model on every target that
runs here; the peers like for like (onnxruntime, ModelOpt, litert-torch + ai-edge-quantizer,
onnxruntime's QNN helpers, each where installed); timestep buckets; speed (interleaved). Each section
names the tool that makes it, so a table can be rerun alone. `--quick` uses a smaller recording and
fewer samples (minutes on two cores instead of hours): the page says which it was. The heavy work runs
at a lower scheduling priority (nice 10), so a shared machine stays usable.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import bench_ort
import bench_tflite
import compare_peers
import compare_qnn_peers
import compare_tflite_peers
import families_table
from compare_peers import describe_headline, fmt, markdown_table
from interleave import speedup

from qcompile.artifact import tool_versions
from qcompile.config import CalibSpec, CompileConfig, FidelitySettings, TargetName, Thresholds
from qcompile.manifest import Manifest
from qcompile.stages import build

SECTIONS = ("families", "reference", "peers", "buckets", "speed")
VERSIONS = ("ai-edge-litert", "onnxruntime-qnn", "nvidia-modelopt", "ai-edge-quantizer", "litert-torch")
REFERENCE = "builtin:reference"


@dataclass(frozen=True)
class Settings:
    """How much each table measures: `full` for the published page, `quick` for a check in minutes."""

    name: str
    calib: str  # the reference model's recording
    per_class: int  # sampled images per class (10 classes)
    families: tuple[str, ...]
    family_calib: str
    qnn_precisions: tuple[str, ...]
    qnn_held_out: int
    device_samples: int
    runs: int  # timed rounds per benchmark
    buckets: tuple[int, ...]


FULL = Settings("full", "sample:32", 20, families_table.FAMILIES, "synthetic:16", ("w8a16", "w8a8"), 16, 2, 50,
                (1, 4, 8))
QUICK = Settings("quick", "sample:8", 2, ("builtin:tiny-unet2d", "builtin:tiny-sd-unet", "builtin:tiny-dit",
                                          "builtin:tiny-vae-decoder"), "synthetic:16", ("w8a8",), 8, 0, 20, (1, 4))


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def tool_command(tool: str, *args: str) -> str:
    return " ".join(["python", f"tools/{tool}", *args])


# --- sections ----------------------------------------------------------------------------------------
def families(s: Settings, out: Path) -> dict:
    rows = [families_table.family_row(m, "ort-int8", s.family_calib, out / "families") for m in s.families]
    return {"title": "Every family on `ort-int8` (tiny random-weight configurations)",
            "command": tool_command("families_table.py", "--calib", s.family_calib, "--only", *s.families),
            "note": f"{s.family_calib} calibration, 8 held-out inputs, the family's default float layers. Random "
                    "weights say little about quality; they show that each family exports, quantizes and runs.",
            "table": families_table.tables(rows), "rows": rows}


def reference_targets() -> list[str]:
    targets = ["ort-int8"]
    if installed("ai_edge_litert"):
        targets += ["tflite-int8", "tflite-fp32"]
    if installed("onnxruntime_qnn"):
        targets += ["qnn-w8a16", "qnn-w8a8"]
    return targets


def reference(s: Settings, out: Path) -> dict:
    """The trained reference model on every target installed here, one recording and one export."""
    rows, export = [], None
    for target in reference_targets():
        t0 = time.perf_counter()
        folder = out / "reference" / target
        cfg = CompileConfig(model=REFERENCE, target=TargetName.parse(target), out_dir=folder,
                            calib=CalibSpec.parse(s.calib), calib_cache=out / "reference" / "calib-cache",
                            export_from=export, thresholds=Thresholds(eps_sqnr_db_mean=None, sample_psnr_db=None),
                            fidelity=FidelitySettings(per_class=s.per_class, device_samples=s.device_samples))
        result = build(cfg)
        export = export or result.out_dir
        summary, checks = result.report["summary"], result.report["checks"]
        rows.append({"target": target, **{k: summary.get(k) for k in (
            "eps_sqnr_db_mean", "eps_sqnr_db_min", "sample_psnr_db", "sample_ssim", "accuracy_q", "frechet_q",
            "frechet_fp32", "size_bytes", "fp32_size_bytes", "htp_vs_cpu_ep_sqnr_db_min")},
            "checks_passed": sum(checks.values()), "checks": len(checks),
            "failed_checks": [k for k, ok in checks.items() if not ok], "seconds": round(time.perf_counter() - t0, 1)})
    lines = ["| target | eps SQNR dB mean (min) | sample PSNR dB | SSIM | accuracy | Fréchet (fp32) | size MB "
             "(fp32) | checks passed |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['target']} | {r['eps_sqnr_db_mean']:.2f} ({r['eps_sqnr_db_min']:.2f}) | "
                     f"{fmt(r['sample_psnr_db'])} | {fmt(r['sample_ssim'])} | {fmt(r['accuracy_q'])} | "
                     f"{fmt(r['frechet_q'])} ({fmt(r['frechet_fp32'])}) | {r['size_bytes'] / 1e6:.2f} "
                     f"({r['fp32_size_bytes'] / 1e6:.2f}) | {r['checks_passed']}/{r['checks']}"
                     + (f" (failed: {', '.join(r['failed_checks'])})" if r["failed_checks"] else "") + " |")
    return {"title": "The reference model on every target",
            "command": f"qcompile build {REFERENCE} --target T --calib {s.calib} --per-class {s.per_class} "
                       f"--device-samples {s.device_samples}",
            "note": f"`{REFERENCE}` (a trained 1.69M-parameter diffusers UNet on 16x16 digits), {s.calib} "
                    f"calibration, DDIM 20 steps, CFG 2.5, {s.per_class * 10} images from the same seeds "
                    "as the float model; defaults otherwise (max estimator, one bucket, the family's float "
                    "layers; QNN: every layer integer, the time embedding on the host). qnn-* numbers are "
                    "the Q/DQ graph on onnxruntime's CPU EP; the checks include the HTP simulator's.",
            "table": "\n".join(lines), "rows": rows}


def run_tool(tool: str, args: list[str], out: Path) -> dict:
    """A comparison tool in its own process (ModelOpt patches onnxruntime's quantizer when imported, which
    breaks onnxruntime's QNN helpers in the same process); its peers.json."""
    subprocess.run([sys.executable, str(Path(__file__).with_name(tool)), "--out", str(out), *args], check=True)
    return json.loads((out / "peers.json").read_text())


def peers(s: Settings, out: Path) -> dict:
    """Every comparison tool, like for like."""
    parts, raw = [], {}
    ort_args = ["--calib", s.calib, "--per-class", str(s.per_class), "--qcompile-args", "", " --full-integer"]
    raw["ort"] = run_tool("compare_peers.py", ort_args, out / "peers-ort")  # a leading space: a value, not a flag
    parts.append(("onnxruntime CPU", tool_command("compare_peers.py", "--calib", s.calib, "--per-class",
                                                  str(s.per_class)), raw["ort"], compare_peers.COLUMNS))
    if installed("ai_edge_litert"):
        tfl_args = ["--calib", s.calib, "--per-class", str(s.per_class), "--runs", str(s.runs)]
        raw["tflite"] = run_tool("compare_tflite_peers.py", tfl_args, out / "peers-tflite")
        parts.append(("LiteRT", tool_command("compare_tflite_peers.py", *tfl_args), raw["tflite"],
                      compare_tflite_peers.COLUMNS))
    if installed("onnxruntime_qnn"):
        qnn_args = ["--calib", s.calib, "--precision", *s.qnn_precisions, "--peers", "ort", "aimet",
                    "--per-channel", "yes", "--held-out", str(s.qnn_held_out), "--samples", "0",
                    "--per-class", str(s.per_class)]
        raw["qnn"] = run_tool("compare_qnn_peers.py", qnn_args, out / "peers-qnn")
        parts.append(("Qualcomm HTP (simulator)", tool_command("compare_qnn_peers.py", *qnn_args), raw["qnn"],
                      compare_qnn_peers.COLUMNS))
    blocks, headlines = [], []
    for name, command, result, columns in parts:
        heads = [result["headline"]] if "headline" in result else result.get("headlines", [])
        heads = [h for h in heads if h]
        headlines += [{"runtime": name, **h} for h in heads]
        blocks.append(f"### {name}\n\n`{command}`\n\n{markdown_table(result['rows'], columns)}\n\n"
                      + "\n".join(f"Like-for-like margin: {describe_headline(h)}." for h in heads))
    summary = ["| runtime | qcompile | best like-for-like peer | metric | qcompile | peer | margin |",
               "|---|---|---|---|---|---|---|"]
    summary += [f"| {h['runtime']} | {h['qcompile']} | {h['peer']} | {h['metric']} | {h['qcompile_value']:.2f} | "
                f"{h['peer_value']:.2f} | {h['margin']:+.2f} |" for h in headlines]
    return {"title": "Peers, like for like",
            "command": "python tools/compare_peers.py, compare_tflite_peers.py, compare_qnn_peers.py (below)",
            "note": "Every method calibrates on the same rows (all of qcompile's recording, written once to "
                    "calibration.npz; `calibration_rows` in each table) and is judged by the same evaluation. "
                    "Each peer appears twice: as shipped (its defaults) and like for like (the nodes qcompile "
                    "keeps float given to the peer's own exclusion option; `float_nodes` counts them). The "
                    "margin compares qcompile's default build with the best like-for-like peer.",
            "table": "\n".join(summary) + "\n\n" + "\n\n".join(blocks), "rows": headlines, "raw": raw}


def buckets(s: Settings, out: Path, reference_dir: Path) -> dict:
    """K timestep buckets on ort-int8, default float layers, max estimator, one recording and export."""
    rows = []
    for k in s.buckets:
        folder = out / "buckets" / f"k{k}"
        cfg = CompileConfig(model=REFERENCE, target=TargetName.ORT_INT8, out_dir=folder, buckets=k,
                            calib=CalibSpec.parse(s.calib), calib_cache=reference_dir / "calib-cache",
                            export_from=reference_dir / "ort-int8",
                            thresholds=Thresholds(eps_sqnr_db_mean=None, sample_psnr_db=None),
                            fidelity=FidelitySettings(per_class=s.per_class))
        summary = build(cfg).report["summary"]
        rows.append({"buckets": k, "folder": str(folder), **{c: summary.get(c) for c in (
            "eps_sqnr_db_mean", "eps_sqnr_db_min", "sample_psnr_db", "sample_ssim", "frechet_q", "size_bytes")}})
    lines = ["| buckets | eps SQNR dB mean (min) | sample PSNR dB | SSIM | Fréchet | files MB |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['buckets']} | {r['eps_sqnr_db_mean']:.2f} ({r['eps_sqnr_db_min']:.2f}) | "
              f"{fmt(r['sample_psnr_db'])} | {fmt(r['sample_ssim'])} | {fmt(r['frechet_q'])} | "
              f"{r['size_bytes'] / 1e6:.2f} |" for r in rows]
    return {"title": "Timestep buckets (`ort-int8`)",
            "command": f"qcompile build {REFERENCE} --buckets K --calib {s.calib} --per-class {s.per_class}",
            "note": "One recording; K buckets of timesteps (edges from the statistics), each with its own "
                    "activation ranges, all sharing one weight file. Same images as the other rows.",
            "table": "\n".join(lines), "rows": rows}


def speed(s: Settings, reference_dir: Path, bucket_rows: list[dict]) -> dict:
    rows, lines = [], []
    folders = [reference_dir / "ort-int8"] + [Path(r["folder"]) for r in bucket_rows if r["buckets"] > 1]
    for folder in folders:
        rows += bench_ort.bench(folder, threads=2, runs=s.runs, batch=2)
    lines.append(bench_ort.table(rows))
    tfl = {}
    if (reference_dir / "tflite-int8").is_dir():
        paths = {label: Manifest.read(reference_dir / label).bucket_files(reference_dir / label)[0]
                 for label in ("tflite-fp32", "tflite-int8")}
        tfl = bench_tflite.side_by_side(paths, 2, s.runs)
        ratio = speedup(tfl["tflite-fp32"].pop("timing"), tfl["tflite-int8"].pop("timing"))
        tfl["speedup"] = ratio.as_dict() | {"text": ratio.describe()}
        lines += ["", "| LiteRT, batch 1 | fp32 ms, median (IQR) | int8 ms, median (IQR) | speed-up (IQR) | "
                      "XNNPACK partitions fp32 / int8 |", "|---|---|---|---|---|",
                  f"| {REFERENCE} | {tfl['tflite-fp32']['text']} | {tfl['tflite-int8']['text']} | {ratio.describe()} | "
                  f"{tfl['tflite-fp32']['xnnpack_partitions']} / {tfl['tflite-int8']['xnnpack_partitions']} |"]
    return {"title": "Speed (2 threads, interleaved)",
            "command": f"{tool_command('bench_ort.py', 'DIR', '--batch', '2', '--runs', str(s.runs))}; "
                       f"{tool_command('bench_tflite.py', 'FP32_DIR', 'INT8_DIR', '--runs', str(s.runs))}",
            "note": f"Both sides timed in one loop, {s.runs} rounds, order alternating (tools/interleave.py); "
                    "the speed-up is the median of the per-round ratios. onnxruntime at batch 2 (one CFG step), "
                    "each bucket on a timestep of its own; LiteRT at batch 1 (XNNPACK). On a shared machine the "
                    "spread is part of the result.",
            "table": "\n".join(lines), "rows": {"ort": rows, "tflite": tfl}}


SCALE_TITLE = "SD-class scale (`tools/bench_scale.py`)"


def scale(docs: Path) -> dict | None:
    """The SD-class rows of `tools/bench_scale.py`, collected in docs/scale.json: a build of an SD 1.5-size
    UNet takes minutes and most of this machine's memory, so this page quotes the benchmark's own
    record instead of running it."""
    path = docs / "scale.json"
    if not path.is_file():
        return None
    rows = json.loads(path.read_text())
    lines = ["| config | target | fp32 weights | build s | peak RSS (x weights) | eps cos mean | int8 vs fp32 |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        w = r["weights_bytes"]
        lines.append(f"| {r['config']} | {scale_target(r)}{scale_reused(r)} | {w / 2**30:.2f} GiB | "
                     f"{r['build_seconds']:.0f} | "
                     f"{r['peak_rss'] / 2**30:.2f} GiB ({r['peak_rss'] / w:.2f}x) | {r['eps_cos_mean']:.4f} | "
                     f"{r['fp32_s'] / r['int8_s']:.2f}x ({scale_runtime(r)}, batch {r['batch']}, "
                     f"{r['threads']} threads) |")
    return {"title": SCALE_TITLE, "command": "python tools/bench_scale.py --config CONFIG [--target tflite-int8]",
            "note": "From docs/scale.json, written by the benchmark (docs/scale.md has each run's stages).",
            "table": "\n".join(lines), "rows": rows}


def scale_target(row: dict) -> str:
    return row.get("target", "ort-int8")  # rows written before the benchmark took --target are ort-int8


def scale_runtime(row: dict) -> str:
    return "LiteRT vs tflite-fp32" if scale_target(row).startswith("tflite") else "onnxruntime CPU"


def scale_reused(row: dict) -> str:
    return " (export and calibration reused)" if row.get("reused") else ""


def with_scale(sections: list[dict], docs: Path) -> list[dict]:
    kept = [x for x in sections if x["title"] != SCALE_TITLE]
    section = scale(docs)
    return kept if section is None else [*kept, section]


# --- the page ----------------------------------------------------------------------------------------
def summary(sections: list[dict]) -> str:
    """The short table the README quotes: each figure as it appears in the sections below."""
    by_title = {s["title"]: s for s in sections}
    metric = {"sample_psnr_db": "sample PSNR", "eps_sqnr_db_mean": "eps SQNR mean"}
    lines = ["| what | measured |", "|---|---|"]
    ref = by_title.get("The reference model on every target")
    for r in ref["rows"] if ref else ():
        psnr = f", sample PSNR {fmt(r['sample_psnr_db'])} dB" if r["sample_psnr_db"] is not None else ""
        lines.append(f"| reference model, `{r['target']}` | eps SQNR {r['eps_sqnr_db_mean']:.2f} dB mean{psnr}, "
                     f"{r['size_bytes'] / 1e6:.2f} MB (fp32 {r['fp32_size_bytes'] / 1e6:.2f} MB) |")
    peer = by_title.get("Peers, like for like")
    for h in peer["rows"] if peer else ():
        lines.append(f"| {h['qcompile']} vs the best like-for-like peer, {h['peer']} | "
                     f"{metric.get(h['metric'], h['metric'])} {h['qcompile_value']:.2f} vs {h['peer_value']:.2f} dB "
                     f"({h['margin']:+.2f}) |")
    buckets = by_title.get("Timestep buckets (`ort-int8`)")
    if buckets and len(buckets["rows"]) > 1:
        one, best = buckets["rows"][0], max(buckets["rows"][1:], key=lambda r: r["sample_psnr_db"] or 0)
        lines.append(f"| `--buckets {best['buckets']}` vs 1, `ort-int8` | sample PSNR {fmt(best['sample_psnr_db'])} vs "
                     f"{fmt(one['sample_psnr_db'])} dB |")
    speed = by_title.get("Speed (2 threads, interleaved)")
    if speed:
        for r in speed["rows"]["ort"][:1]:
            lines.append(f"| int8 vs fp32 speed, onnxruntime, batch {r['batch']} | {r['text']['speedup']} |")
        if speed["rows"]["tflite"]:
            lines.append(f"| int8 vs fp32 speed, LiteRT, batch 1 | {speed['rows']['tflite']['speedup']['text']} |")
    sd = by_title.get(SCALE_TITLE)
    for r in sd["rows"] if sd else ():
        if r["config"] == "quick":
            continue
        w = r["weights_bytes"]
        baseline = "tflite-fp32 (LiteRT, batch 1)" if scale_target(r).startswith("tflite") else "fp32"
        lines.append(f"| `{r['config']}` UNet ({w / 2**30:.1f} GiB fp32), `{scale_target(r)}` build{scale_reused(r)} | "
                     f"{r['build_seconds']:.0f} s, peak {r['peak_rss'] / 2**30:.2f} GiB = {r['peak_rss'] / w:.2f}x "
                     f"the weights, eps cos {r['eps_cos_mean']:.4f}, int8 {r['fp32_s'] / r['int8_s']:.2f}x "
                     f"faster than {baseline} |")
    return "\n".join(lines)


def page(sections: list[dict], meta: dict) -> str:
    parts = ["# Results",
             f"Generated by `{meta['command']}` on {meta['date']} ({meta['settings']} settings, "
             f"{meta['seconds'] / 60:.0f} minutes) on {meta['machine']}. Every table below comes from that "
             "run; each section names the command that makes it alone. Regenerate the page with "
             "`python tools/results.py` (`--quick` for the small settings).",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + ".",
             "## Summary", summary(sections)]
    for s in sections:
        parts += [f"## {s['title']}", f"Command: `{s['command']}`", s["note"], s["table"]]
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small settings: minutes, not hours")
    ap.add_argument("--out", type=Path, default=Path("out/results"), help="artifacts and raw tables")
    ap.add_argument("--docs", type=Path, default=Path("docs"), help="where results.md and results.json go")
    ap.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    ap.add_argument("--render", action="store_true",
                    help="measure nothing: rewrite results.md from the results.json of an earlier run")
    args = ap.parse_args(argv)
    if args.render:
        data = json.loads((args.docs / "results.json").read_text())
        data["sections"] = with_scale(data["sections"], args.docs)
        (args.docs / "results.md").write_text(page(data["sections"], data["meta"]))
        (args.docs / "results.json").write_text(json.dumps(data, indent=1, default=str))
        return
    os.nice(10)
    s = QUICK if args.quick else FULL
    t0 = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    reference_dir = args.out / "reference"
    sections = []
    if "families" in args.only:
        sections.append(families(s, args.out))
    if "reference" in args.only or {"buckets", "speed"} & set(args.only):
        ref = reference(s, args.out)
        if "reference" in args.only:
            sections.append(ref)
    if "peers" in args.only:
        sections.append(peers(s, args.out))
    bucket_rows = []
    if {"buckets", "speed"} & set(args.only):
        b = buckets(s, args.out, reference_dir)
        bucket_rows = b["rows"]
        if "buckets" in args.only:
            sections.append(b)
    if "speed" in args.only:
        sections.append(speed(s, reference_dir, bucket_rows))
    sections = with_scale(sections, args.docs)
    meta = {"command": "python tools/results.py" + (" --quick" if args.quick else ""),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "settings": s.name, "seconds": round(time.perf_counter() - t0, 1),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}",
            "versions": tool_versions(VERSIONS), "sections": [x["title"] for x in sections]}
    args.docs.mkdir(parents=True, exist_ok=True)
    (args.docs / "results.md").write_text(page(sections, meta))
    (args.docs / "results.json").write_text(json.dumps({"meta": meta, "sections": sections}, indent=1, default=str))
    print(f"[results] wrote {args.docs / 'results.md'} and results.json in {meta['seconds'] / 60:.1f} min",
          file=sys.stderr)


if __name__ == "__main__":
    main()
