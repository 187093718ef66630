"""Where a Q/DQ artifact's error comes from: its activation quantization points grouped by kind, per bucket.

    python tools/qdq_error_budget.py --artifact OUT --calib-cache CACHE [--rows 64] [--out out/error-budget]

For an artifact whose buckets are Q/DQ ONNX graphs (`ort-int8`, `qnn-w8a8`, `qnn-w8a16`), on each
bucket's recorded rows (both CFG halves of calls at the bucket's calibration timesteps, as per-bucket
mixed precision measures them), the output SQNR against the float model of:
  - the bucket as built, and with every activation float (weights only);
  - each kind of quantization point made float (the gain it would bring alone);
  - only that kind quantized, every other activation float (what it costs alone), from which its share
    of the error power: errors of independent roundings add in power, so the shares of a bucket sum
    to about 1 when the kinds do not interact.
A quantization point's kind is the op that computes the value: the op type of its producer, looked up
through data-movement ops (Reshape, Transpose, ...), which carry their input's scale and so re-round
nothing; graph inputs are kinds of their own (`input:sample`). Time embeddings computed on the host
are graph inputs of the bucket graphs (`input:...`).
The answer decides what a fix can be: if one kind holds most of the error, raising or re-ranging that
kind pays; if the shares are spread, no handful of layers will close the gap.
Writes table.md, table.json and budget.png (error shares per bucket).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx

from qcompile.bucket_precision import bucket_probe_rows
from qcompile.calibration.cache import CalibrationCache
from qcompile.config import TargetName
from qcompile.evaluation.metrics import sqnr_db
from qcompile.manifest import Manifest
from qcompile.runtime import OnnxRunner
from qcompile.stages import FP32_DIR
from qcompile.target import load_target

# Ops that move values without computing new ones: their output's Q/DQ repeats their input's parameters.
DATA_MOVEMENT = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Slice", "Split", "Resize",
                           "Gather", "Expand", "Tile", "DepthToSpace", "SpaceToDepth", "Identity",
                           "DequantizeLinear", "QuantizeLinear"})
Q_DQ_TARGETS = (TargetName.ORT_INT8, TargetName.QNN_W8A8, TargetName.QNN_W8A16)
BATCH = 16


def point_kinds(model: onnx.ModelProto) -> dict[str, str]:
    """Activation quantization points (the QuantizeLinear nodes' names) -> their kind."""
    graph = model.graph
    constants = {i.name for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}

    def kind_of(value: str) -> str:
        node = producer.get(value)
        while node is not None and node.op_type in DATA_MOVEMENT:
            value = node.input[0]
            node = producer.get(value)
        return f"input:{value}" if node is None else node.op_type

    return {q.name: kind_of(q.input[0]) for q in graph.node
            if q.op_type == "QuantizeLinear" and q.input[0] not in constants}


def without_points(model: onnx.ModelProto, points: Iterable[str]) -> onnx.ModelProto:
    """A copy of `model` with the named activation Q/DQ pairs removed: their readers take the float value."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph, points = out.graph, set(points)
    dequantizers: dict[str, list] = {}  # quantized tensor -> the DequantizeLinear nodes reading it
    for node in graph.node:
        if node.op_type == "DequantizeLinear":
            dequantizers.setdefault(node.input[0], []).append(node)
    bypass: dict[str, str] = {}
    dropped = []
    for q in graph.node:
        if q.name in points:
            dropped.append(q)
            for dq in dequantizers.get(q.output[0], ()):
                bypass[dq.output[0]] = q.input[0]
                dropped.append(dq)

    def resolve(value: str) -> str:
        while value in bypass:
            value = bypass[value]
        return value

    for node in graph.node:
        for i, value in enumerate(node.input):
            node.input[i] = resolve(value)
    for node in dropped:
        graph.node.remove(node)
    for output in graph.output:  # keep the output names: an Identity from the float value
        if resolve(output.name) != output.name:
            graph.node.append(onnx.helper.make_node("Identity", [resolve(output.name)], [output.name]))
    return out


class BucketBudget:
    """One bucket: its graph, rows and float reference; `sqnr(points)` runs it with `points` float."""

    def __init__(self, folder: Path, manifest: Manifest, bucket: int, rows, reference: np.ndarray, work: Path):
        self.folder, self.manifest, self.bucket = folder, manifest, bucket
        self.rows, self.reference, self.work = rows, reference, work
        self.file = manifest.bucket_files(folder)[bucket]
        self.model = onnx.load(str(self.file), load_external_data=False)
        self.kinds = point_kinds(self.model)
        self.target = load_target(TargetName.parse(manifest.target))

    def sqnr(self, float_points: Iterable[str]) -> float:
        variant = self.work / self.file.name
        assert not variant.is_symlink(), variant
        onnx.save(without_points(self.model, float_points), str(variant))
        runner = self.target.runner(self.work, self.manifest)
        got = np.concatenate([runner.run(feed) for _, feed in self.rows.inputs.batches(BATCH)])
        runner.release()
        return sqnr_db(self.reference, got)


def budget(b: BucketBudget, detail_share: float) -> dict:
    """Each kind's SQNR alone and share; the gain of making a kind float is measured for the kinds whose
    share is at least `detail_share` (each is one more run of the bucket's rows)."""
    kinds = Counter(b.kinds.values())
    everything = list(b.kinds)
    base = b.sqnr(())
    weights_only = b.sqnr(everything)
    floor = 10 ** (-weights_only / 10)  # what the weights alone cost: in every "alone" run
    rows = []
    for kind, count in kinds.most_common():
        alone = b.sqnr([p for p in everything if b.kinds[p] != kind])
        rows.append({"kind": kind, "q_nodes": count, "alone_sqnr_db": round(alone, 2),
                     "_power": max(0.0, 10 ** (-alone / 10) - floor)})
    total = sum(r["_power"] for r in rows)
    for r in rows:
        r["error_share"] = round(r.pop("_power") / total, 3)
        mine = [p for p, k in b.kinds.items() if k == r["kind"]]
        r["float_gain_db"] = round(b.sqnr(mine) - base, 2) if r["error_share"] >= detail_share else None
    rows.sort(key=lambda r: -r["error_share"])
    b.sqnr(())  # the work folder's graph back as built
    # Independent errors add in power: how much of the measured activation error the kinds' sum explains.
    explained = total / max(10 ** (-base / 10) - floor, 1e-30)
    return {"bucket": b.bucket, "timesteps": b.manifest.buckets[b.bucket].calibration_timesteps,
            "rows": int(b.rows.inputs.count), "sqnr_db": round(base, 2), "weights_only_sqnr_db": round(weights_only, 2),
            "sum_of_kinds_over_measured": round(explained, 2), "kinds": rows}


def work_folder(folder: Path, manifest: Manifest, root: Path) -> Path:
    """A folder that reads like the artifact, whose bucket graphs the variants overwrite: the artifact
    itself is never written. Weight files are hard-linked where the file system allows (onnxruntime
    refuses external data reached through a symbolic link out of the model's folder), else copied;
    the bucket graphs are always copied."""
    work = root / "artifact"
    work.mkdir()
    graphs = {f.name for f in manifest.bucket_files(folder)}
    for path in folder.iterdir():
        if path.is_file() and path.name not in graphs and path.stat().st_size > 2**20:
            try:
                os.link(path, work / path.name)
                continue
            except OSError:
                pass
        if path.is_file():
            shutil.copy(path, work / path.name)
    if (folder / FP32_DIR).is_dir():
        (work / FP32_DIR).symlink_to((folder / FP32_DIR).resolve())
    return work


def plot(results: list[dict], path: Path, least: float = 0.02) -> None:
    """Stacked shares per bucket: the kinds holding at least `least` of some bucket's error, the rest as one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def share(r: dict, kind: str) -> float:
        return next((x["error_share"] for x in r["kinds"] if x["kind"] == kind), 0.0)

    shown = sorted({k["kind"] for r in results for k in r["kinds"] if k["error_share"] >= least},
                   key=lambda k: -sum(share(r, k) for r in results))
    colors = plt.get_cmap("tab20").colors
    fig, ax = plt.subplots(figsize=(7, 4))
    labels = [f"bucket {r['bucket']}\n{r['sqnr_db']} dB" for r in results]
    bottom = np.zeros(len(results))
    for i, kind in enumerate([*shown, "other kinds"]):
        values = np.array([share(r, kind) if kind in shown else 1.0 - sum(share(r, k) for k in shown)
                           for r in results])
        ax.bar(labels, values, bottom=bottom, label=kind, color=colors[i % len(colors)])
        bottom += values
    ax.set_ylabel("share of the activation error power")
    ax.set_title("activation quantization error by kind, per timestep bucket")
    ax.legend(fontsize=8, bbox_to_anchor=(1.0, 1.0), loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def table(results: list[dict]) -> str:
    lines = []
    for r in results:
        lines += [f"### bucket {r['bucket']} (timesteps {r['timesteps']}, {r['rows']} rows): "
                  f"{r['sqnr_db']} dB as built, {r['weights_only_sqnr_db']} dB with every activation float; "
                  f"the kinds' errors sum to {r['sum_of_kinds_over_measured']}x the measured activation error", "",
                  "| kind | Q nodes | share of the activation error | SQNR, only this kind quantized (dB) | "
                  "gain, this kind float (dB) |",
                  "|---|---|---|---|---|"]
        shown = [k for k in r["kinds"] if k["float_gain_db"] is not None]
        rest = [k for k in r["kinds"] if k["float_gain_db"] is None]
        lines += [f"| {k['kind']} | {k['q_nodes']} | {k['error_share']:.1%} | {k['alone_sqnr_db']} | "
                  f"{k['float_gain_db']:+.2f} |" for k in shown]
        if rest:
            lines.append(f"| {len(rest)} other kinds | {sum(k['q_nodes'] for k in rest)} | "
                         f"{sum(k['error_share'] for k in rest):.1%} | | |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", type=Path, required=True)
    ap.add_argument("--calib-cache", type=Path, required=True, help="the cache the artifact was calibrated from")
    ap.add_argument("--rows", type=int, default=64, help="recorded rows per bucket")
    ap.add_argument("--buckets", type=int, nargs="*", help="only these buckets (default: all)")
    ap.add_argument("--detail-share", type=float, default=0.02,
                    help="measure the float gain of the kinds with at least this share of the error")
    ap.add_argument("--out", type=Path, default=Path("out/error-budget"))
    args = ap.parse_args()
    manifest = Manifest.read(args.artifact)
    if TargetName.parse(manifest.target) not in Q_DQ_TARGETS:
        ap.error(f"--artifact: {args.artifact} is a {manifest.target} artifact; this tool reads Q/DQ ONNX buckets "
                 f"({', '.join(t.value for t in Q_DQ_TARGETS)})")
    recording = CalibrationCache.open(args.calib_cache).recording()
    reference = OnnxRunner([manifest.fp32_path(args.artifact)], timestep_name=manifest.model.timestep_input,
                           sample_name=manifest.model.sample_input)
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory(dir=args.out) as tmp:
        work = work_folder(args.artifact, manifest, Path(tmp))
        for k in args.buckets if args.buckets else range(len(manifest.buckets)):
            if not 0 <= k < len(manifest.buckets):
                ap.error(f"--buckets: {k} is not a bucket of {args.artifact} (0..{len(manifest.buckets) - 1})")
            rows = bucket_probe_rows(recording, manifest.buckets[k].calibration_timesteps, args.rows)
            ref = np.concatenate([reference.run(feed) for _, feed in rows.inputs.batches(BATCH)])
            result = budget(BucketBudget(args.artifact, manifest, k, rows, ref, work), args.detail_share)
            print(table([result]), flush=True)
            results.append(result)
    (args.out / "table.md").write_text(table(results))
    (args.out / "table.json").write_text(json.dumps(results, indent=2))
    plot(results, args.out / "budget.png")
    print(f"wrote {args.out}/table.md, table.json, budget.png")


if __name__ == "__main__":
    main()
