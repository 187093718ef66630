"""Scale benchmark: an SD-class UNet with random weights, built for ort-int8 (or tflite-int8),
measured per stage.

    python tools/bench_scale.py --quick                      # a small UNet, a few minutes
    python tools/bench_scale.py --config sd15-32 [--out out/scale] [--calib synthetic:8]
    python tools/bench_scale.py --config sd15-64 --target tflite-int8 --reuse out/scale/sd15-64

For the config it makes the random-weight model folder (seeded), runs `qcompile build MODEL --target
ort-int8 --calib CALIB` as a subprocess and records, per build stage (from the build's own
`[qcompile] ...` stage lines), wall time and peak resident memory of the whole process tree (sampled
from /proc). Then from the artifact: output cosine and SQNR against fp32 on held-back rows
(report.json), artifact size, and int8 against fp32 latency in onnxruntime CPU (interleaved runs,
median). NVIDIA ModelOpt's ONNX int8 is measured on the same float model and calibration rows when
`modelopt` is importable (optional extra `peers`, or `--modelopt-python` naming another environment's
interpreter); otherwise the table says it was not run.
`--target tflite-int8` builds the same model for tflite-int8 and for its float baseline tflite-fp32
(both at the static batch `--batch`, default 1) and times the two .tflite files side by side in the
LiteRT interpreter (XNNPACK, interleaved runs: tools/bench_tflite.py), with their XNNPACK partition
and operator counts; ModelOpt writes ONNX, so it has no row there. `--reuse DIR` (an earlier run's
folder for the same config) takes DIR's model, float export and a copy of its calibration cache
instead of exporting and calibrating again (at 64x64 calibration alone takes minutes).
Writes OUT/scale.json and OUT/scale.md (one table per config; docs/scale.md collects them), or
scale-tflite-int8.json / .md for `--target tflite-int8`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

SD15 = {"sample_size": 32, "cross_attention_dim": 768, "attention_head_dim": 8}
CONFIGS = {
    # Three levels with cross-attention, SD's layout at a fraction of the width: minutes on 2 cores.
    "quick": {"sample_size": 16, "block_out_channels": [128, 256, 256], "layers_per_block": 1,
              "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
              "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
              "cross_attention_dim": 768, "attention_head_dim": 8},
    "sd15-32": SD15,
    "sd15-64": {**SD15, "sample_size": 64},
    "sdxl-32": {"sample_size": 32, "block_out_channels": [320, 640, 1280], "layers_per_block": 2,
                "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                "transformer_layers_per_block": [1, 2, 10], "attention_head_dim": [5, 10, 20],
                "use_linear_projection": True, "cross_attention_dim": 2048,
                "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
                "projection_class_embeddings_input_dim": 2816},
}
# Build stage lines ("[qcompile] exporting ...") -> stage names; the time before the first is loading.
STAGES = (("exporting", "export"), ("reusing", "export"), ("calibrating", "calibrate"), ("smoothing", "smooth"),
          ("measuring", "sensitivity"), ("quantizing", "quantize"), ("writing", "emit"),
          ("evaluating", "evaluate"))
PAGE = os.sysconf("SC_PAGE_SIZE")


def make_model(config: str, folder: Path, seed: int) -> None:
    """The diffusers model folder (config.json + safetensors) of `config` with seeded random weights."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    UNet2DConditionModel(**CONFIGS[config]).save_pretrained(folder)


def tree_rss(root: int) -> tuple[int, int]:
    """Resident bytes of `root` and all its descendants, and how many of them are file-backed (mapped
    files such as weights read through a memory map: page cache the kernel may drop, unlike the rest),
    read from /proc; vanished processes count 0."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    total, shared, todo = 0, 0, [root]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            with open(f"/proc/{pid}/statm") as f:
                fields = f.read().split()
            total += int(fields[1]) * PAGE
            shared += int(fields[2]) * PAGE
        except (OSError, IndexError, ValueError):
            pass
    return total, shared


def run_measured(cmd: list[str], log: Path) -> list[dict]:
    """Run `cmd`; per stage: name, seconds, peak tree RSS (bytes). Output goes to `log`."""
    stages = [{"stage": "load", "start": time.perf_counter(), "peak": 0, "peak_file": 0}]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=out, text=True, bufsize=1)
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                rss, file_backed = tree_rss(proc.pid)
                if rss > stages[-1]["peak"]:
                    stages[-1].update(peak=rss, peak_file=file_backed)
                done.wait(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        for line in proc.stdout:
            out.write(line)
            out.flush()
            if line.startswith("[qcompile] "):
                word = line[len("[qcompile] "):].split(" ", 1)[0]
                name = next((s for w, s in STAGES if w == word), None)
                if name is not None:
                    prev = stages[-1]
                    rss, file_backed = tree_rss(proc.pid)
                    stages.append({"stage": name, "start": time.perf_counter(), "peak": rss, "peak_file": file_backed})
                    # A stage's numbers as soon as it ends: a benchmark stopped early still has them.
                    out.write(f"[bench] {prev['stage']}: {stages[-1]['start'] - prev['start']:.1f} s, "
                              f"peak {gib(prev['peak'])} ({gib(prev['peak_file'])} file-backed)\n")
        rc = proc.wait()
        done.set()
        sampler.join()
    end = time.perf_counter()
    if rc != 0:
        raise SystemExit(f"build failed ({rc}); see {log}")
    for s, nxt in zip(stages, [*stages[1:], None], strict=True):
        s["seconds"] = round((nxt["start"] if nxt else end) - s.pop("start"), 1)
    return stages


def latency(fp32: Path, int8: Path, feed: dict[str, np.ndarray], threads: int, runs: int) -> tuple[float, float]:
    """Median seconds of fp32 and int8, runs interleaved so both see the same machine load."""
    from qcompile.runtime import make_session

    sessions = [make_session(fp32, threads=threads), make_session(int8, threads=threads)]
    for s in sessions:
        s.run(None, feed)
    times: list[list[float]] = [[], []]
    for _ in range(runs):
        for i, s in enumerate(sessions):
            t0 = time.perf_counter()
            s.run(None, feed)
            times[i].append(time.perf_counter() - t0)
    return statistics.median(times[0]), statistics.median(times[1])


def make_feed(manifest: dict, batch: int) -> dict[str, np.ndarray]:
    """Random inputs of the manifest's shapes at `batch` (latency does not depend on the values)."""
    rng = np.random.default_rng(0)
    feed = {}
    for spec in manifest["model"]["inputs"]:
        shape = (batch, *spec["shape"][1:])
        if spec["dtype"] == "int64":
            feed[spec["name"]] = rng.integers(0, 10, shape).astype(np.int64)
        elif spec["role"] == "timestep":
            feed[spec["name"]] = rng.uniform(0, manifest["model"]["timestep_scale"], shape).astype(np.float32)
        else:
            feed[spec["name"]] = rng.standard_normal(shape).astype(np.float32)
    return feed


def files_bytes(folder: Path, names) -> int:
    return sum((folder / n).stat().st_size for n in dict.fromkeys(names))


def modelopt_row(model: Path, artifact: Path, fp32: Path, work: Path, feed, args) -> dict:
    """ModelOpt's ONNX int8 (max calibration) on the build's float model and calibration rows, judged on
    the build's held-out rows (the same synthetic seeds) by eps cosine and SQNR against fp32."""
    python, method = args.modelopt_python, "nvidia-modelopt int8"
    if args.skip_modelopt:
        return {"method": method, "note": f"not run: {args.skip_modelopt}"}
    if subprocess.run([python, "-c", "import modelopt.onnx.quantization"], capture_output=True).returncode:
        return {"method": method, "note": f"not run: modelopt is not importable by {python} "
                "(pip install 'qcompile[peers]', or --modelopt-python naming an interpreter that has it)"}
    from qcompile.calibration.cache import CalibrationCache
    from qcompile.evaluation.evaluate import held_out_inputs
    from qcompile.evaluation.metrics import cosine, sqnr_db
    from qcompile.models.source import resolve_model
    from qcompile.runtime import make_session

    data = CalibrationCache.open(artifact.parent / "calib-cache").recording().spread_rows(8)
    work.mkdir(parents=True, exist_ok=True)
    out = work / "model.onnx"
    np.savez(work / "calib.npz", **data.arrays)
    cmd = [python, "-c", "import sys, numpy as np; from modelopt.onnx.quantization import quantize; "
           "d = dict(np.load(sys.argv[2])); quantize(onnx_path=sys.argv[1], quantize_mode='int8', "
           "calibration_data=d, calibration_method='max', output_path=sys.argv[3], calibration_eps=['cpu'], "
           "high_precision_dtype='fp32', use_external_data_format=True)", str(fp32), str(work / "calib.npz"),
           str(out)]
    stages = run_measured(cmd, work / "modelopt.log")
    adapter = resolve_model(str(model), seed=args.seed)
    adapter.module.to("meta")  # only its input signature is needed
    held = held_out_inputs(adapter, 8, args.seed)
    ref, test = make_session(fp32), make_session(out)
    cos, sqnr = [], []
    for i in range(held.count):
        row = held.take(slice(i, i + 1))
        a, b = ref.run(None, row)[0], test.run(None, row)[0]
        cos.append(cosine(a, b))
        sqnr.append(sqnr_db(a, b))
    del ref, test
    t32, t8 = latency(fp32, out, feed, args.threads, args.runs)
    return {"method": method, "seconds": sum(s["seconds"] for s in stages), "peak_rss": max(s["peak"] for s in stages),
            "eps_cos_mean": float(np.mean(cos)), "eps_sqnr_db_mean": float(np.mean(sqnr)),
            "eps_sqnr_db_min": float(np.min(sqnr)), "int8_bytes": files_bytes(work, [p.name for p in work.iterdir()
                                                                                   if p.name.startswith("model")]),
            "fp32_s": t32, "int8_s": t8}


def build_cmd(model: Path, target: str, out: Path, cache: Path, args, *extra: str) -> list[str]:
    return [sys.executable, "-m", "qcompile.cli", "build", str(model), "--target", target, "--calib", args.calib,
            "--seed", str(args.seed), "--out", str(out), "--calib-cache", str(cache), "--min-sqnr-db", "-1000",
            *extra, *args.build_args.split()]


def tflite_latency(fp32: Path, int8: Path, args) -> dict:
    """The two .tflite files timed side by side in the LiteRT interpreter (tools/bench_tflite.py)."""
    from bench_tflite import side_by_side  # sibling tools (tools/ is on sys.path when run); needs ai_edge_litert
    from interleave import speedup

    rows = side_by_side({"fp32": fp32, "int8": int8}, args.threads, args.runs)
    paired = speedup(rows["fp32"].pop("timing"), rows["int8"].pop("timing"))
    fp, q = rows["fp32"], rows["int8"]
    return {"fp32_s": fp["median_ms"] / 1e3, "int8_s": q["median_ms"] / 1e3, "speedup_paired": paired.as_dict(),
            "speedup_text": paired.describe(), "fp32_text": fp["text"], "int8_text": q["text"],
            "xnnpack_partitions": [fp["xnnpack_partitions"], q["xnnpack_partitions"]],
            "operators": [fp["operators"], q["operators"]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=sorted(CONFIGS), default="sd15-32")
    ap.add_argument("--quick", action="store_true", help="the small config (same as --config quick)")
    ap.add_argument("--out", type=Path, default=Path("out/scale"))
    ap.add_argument("--calib", default="synthetic:8")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--target", choices=("ort-int8", "tflite-int8"), default="ort-int8",
                    help="tflite-int8: also builds tflite-fp32 and times both in the LiteRT interpreter")
    ap.add_argument("--reuse", type=Path, metavar="DIR",
                    help="an earlier run's folder of the same config: reuse its model, float export and (a copy "
                         "of) its calibration cache")
    ap.add_argument("--runs", type=int, help="timed rounds (default 10 for ort-int8, 20 for tflite-int8)")
    ap.add_argument("--batch", type=int,
                    help="ort-int8: batch of the timed runs (default 2); tflite-int8: the static batch both .tflite "
                         "files are built for (default 1)")
    ap.add_argument("--modelopt-python", default=sys.executable,
                    help="interpreter that runs ModelOpt (its [onnx] extra pins its own onnxruntime, so it may "
                         "live in another virtual environment)")
    ap.add_argument("--skip-modelopt", metavar="REASON", default="",
                    help="leave ModelOpt out, saying why in the table (e.g. it would not fit in memory)")
    ap.add_argument("--build-args", default="", help="extra qcompile build options (one string)")
    args = ap.parse_args()
    config = "quick" if args.quick else args.config
    tflite = args.target == "tflite-int8"
    args.runs = args.runs or (20 if tflite else 10)
    args.batch = args.batch or (1 if tflite else 2)
    work = args.out / config
    reuse = args.reuse
    if reuse is not None and not (reuse / "artifact" / "manifest.json").is_file():
        ap.error(f"--reuse {reuse}: no earlier run there (artifact/manifest.json is missing)")
    model = (reuse or work) / "model"
    if not (model / "config.json").is_file():
        t0 = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--_make", config, str(model), str(args.seed)], check=True)
        print(f"[bench] made {model} in {time.perf_counter() - t0:.0f}s", flush=True)
    weights = files_bytes(model, [p.name for p in model.glob("*.safetensors")])
    work.mkdir(parents=True, exist_ok=True)
    cache = work / "calib-cache"
    if reuse is None or reuse.resolve() != work.resolve():
        subprocess.run(["rm", "-rf", str(cache)], check=True)
    if reuse is not None and not cache.exists():
        shutil.copytree(reuse / "calib-cache", cache)  # a copy: the earlier run's cache stays as it was
    export = ["--from-export", str(reuse / "artifact")] if reuse is not None else []
    static = ["--static-batch", str(args.batch)] if tflite else []
    artifact = work / ("tflite-int8" if tflite else "artifact")
    stages = run_measured(build_cmd(model, args.target, artifact, cache, args, *export, *static),
                          work / ("build-tflite-int8.log" if tflite else "build.log"))
    report = json.loads((artifact / "report.json").read_text())
    manifest = json.loads((artifact / "manifest.json").read_text())
    summary = report["summary"]
    int8_file = artifact / manifest["buckets"][0]["files"][0]
    row = {"config": config, "unet": CONFIGS[config], "calib": args.calib, "target": args.target,
           "reused": str(reuse) if reuse else None, "weights_bytes": weights,
           "stages": stages, "build_seconds": sum(s["seconds"] for s in stages),
           "peak_rss": max(s["peak"] for s in stages),
           "eps_cos_mean": summary.get("eps_cos_mean"), "eps_sqnr_db_mean": summary.get("eps_sqnr_db_mean"),
           "eps_sqnr_db_min": summary.get("eps_sqnr_db_min"),
           "int8_bytes": files_bytes(artifact, manifest["buckets"][0]["files"]),
           "batch": args.batch, "threads": args.threads, "runs": args.runs}
    if tflite:
        baseline = work / "tflite-fp32"
        fp32_stages = run_measured(build_cmd(model, "tflite-fp32", baseline, cache, args,
                                             "--from-export", str(artifact), *static), work / "build-tflite-fp32.log")
        fp32_file = baseline / json.loads((baseline / "manifest.json").read_text())["buckets"][0]["files"][0]
        row.update(fp32_bytes=fp32_file.stat().st_size, peers=[],
                   fp32_build={"seconds": sum(s["seconds"] for s in fp32_stages),
                               "peak_rss": max(s["peak"] for s in fp32_stages)},
                   **tflite_latency(fp32_file, int8_file, args))
    else:
        fp32 = artifact / manifest["source"]["fp32_model"]
        feed = make_feed(manifest, args.batch)
        t32, t8 = latency(fp32, int8_file, feed, args.threads, args.runs)
        row.update(fp32_bytes=files_bytes(fp32.parent, [fp32.name, fp32.name + ".data"]), fp32_s=t32, int8_s=t8,
                   peers=[modelopt_row(model, artifact, fp32, work / "modelopt", feed, args)])
    stem = "scale-tflite-int8" if tflite else "scale"
    (work / f"{stem}.json").write_text(json.dumps(row, indent=2))
    text = table(row)
    (work / f"{stem}.md").write_text(text)
    print(text)


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def table(r: dict) -> str:
    w = r["weights_bytes"]
    lines = [f"### {r['config']}: UNet2DConditionModel({', '.join(f'{k}={v}' for k, v in r['unet'].items())})",
             "", f"fp32 weights {gib(w)}; `--target {r.get('target', 'ort-int8')} --calib {r['calib']}`"
             + (f" (model, float export and calibration cache of {r['reused']})" if r.get("reused") else ""), "",
             "| stage | wall s | peak RSS (tree) | of which file-backed | x weights |", "|---|---|---|---|---|"]
    lines += [f"| {s['stage']} | {s['seconds']:.1f} | {gib(s['peak'])} | {gib(s.get('peak_file', 0))} | "
              f"{s['peak'] / w:.2f} |" for s in r["stages"]]
    lines += [f"| **build** | {r['build_seconds']:.1f} | {gib(r['peak_rss'])} | | {r['peak_rss'] / w:.2f} |", "",
              "| method | eps cos mean | eps SQNR dB mean / min | size vs fp32 | fp32 s | int8 s | speed-up "
              f"(batch {r['batch']}, {r['threads']} threads) |", "|---|---|---|---|---|---|---|",
              f"| qcompile {r.get('target', 'ort-int8')} | {r['eps_cos_mean']:.4f} | {r['eps_sqnr_db_mean']:.2f} / "
              f"{r['eps_sqnr_db_min']:.2f} | {r['int8_bytes'] / r['fp32_bytes']:.3f} | {r['fp32_s']:.3f} | "
              f"{r['int8_s']:.3f} | {r['fp32_s'] / r['int8_s']:.2f}x |"]
    for p in r["peers"]:
        if "note" in p:
            lines.append(f"| {p['method']} | {p['note']} | | | | | |")
        else:
            lines.append(f"| {p['method']} ({p['seconds']:.0f} s, peak {gib(p['peak_rss'])}) | "
                         f"{p['eps_cos_mean']:.4f} | {p['eps_sqnr_db_mean']:.2f} / {p['eps_sqnr_db_min']:.2f} | "
                         f"{p['int8_bytes'] / r['fp32_bytes']:.3f} | {p['fp32_s']:.3f} | {p['int8_s']:.3f} | "
                         f"{p['fp32_s'] / p['int8_s']:.2f}x |")
    if r.get("target") == "tflite-int8":
        fb = r["fp32_build"]
        lines += ["", f"LiteRT interpreter, XNNPACK, {r['threads']} threads, static batch {r['batch']}, "
                      f"{r['runs']} interleaved rounds: fp32 {r['fp32_text']}, "
                      f"int8 {r['int8_text']}, paired speed-up {r['speedup_text']}; XNNPACK partitions fp32 / int8 "
                      f"{r['xnnpack_partitions'][0]} / {r['xnnpack_partitions'][1]}, operators "
                      f"{r['operators'][0]} / {r['operators'][1]}. The tflite-fp32 build: {fb['seconds']:.1f} s, "
                      f"peak {gib(fb['peak_rss'])}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if sys.argv[1:2] == ["--_make"]:
        make_model(sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]))
    else:
        main()
