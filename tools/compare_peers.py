"""qcompile ort-int8 against peer quantizers, like for like: the same float model, the same calibration
rows, the same float layers, the same evaluation.

    python tools/compare_peers.py [--model builtin:reference] [--out out/peers] [--calib sample:32]
        [--qcompile-args "" "--full-integer"] [--per-class 20] [--peers ort modelopt]

Calibration: qcompile records its inputs once (the cache in OUT/calib-cache); every recorded row is
written once to OUT/calibration.npz (one array per ONNX input, rows stacked: the layout ModelOpt
reads) and every method calibrates on exactly those rows, so the table's row counts agree.

Peers, each in two rows: as shipped (its defaults, every layer it quantizes), and like for like
(the nodes qcompile's default build keeps float, from the manifest's exclusion patterns, given to the
peer's own exclusion option, `nodes_to_exclude` for both). The table counts, for every method, the
float nodes it was given and the activations it really quantized (QuantizeLinear nodes not on
weights). The peers: onnxruntime `quantize_static` (QDQ, per-channel, U8S8: what its docs recommend
for x86 CPU) and NVIDIA ModelOpt ONNX int8 PTQ (max calibration) when `modelopt` is importable
(optional extra `peers`). Each peer model is wrapped as an
artifact folder next to qcompile's and judged by the same `evaluate_artifact`. The headline is
qcompile's default build against the best like-for-like peer. Writes OUT/peers.md and peers.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shlex
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from qcompile.calibration.cache import CalibrationCache
from qcompile.calibration.inputs import InputSet
from qcompile.cli import main as qcompile_main
from qcompile.config import FidelitySettings, Thresholds
from qcompile.evaluation.evaluate import evaluate_artifact, held_out_inputs
from qcompile.graph_io import load_graph
from qcompile.manifest import BucketRecord, Manifest
from qcompile.models.source import resolve_model
from qcompile.passes.insert_qdq import is_excluded

COLUMNS = ("method", "float_nodes", "quantized_activations", "calibration_rows", "eps_cos_mean",
           "eps_sqnr_db_mean", "eps_sqnr_db_min", "sample_psnr_db", "sample_ssim", "accuracy_q", "frechet_q",
           "size_bytes", "seconds")
NPZ = "calibration.npz"


# --- the shared calibration rows and float layers (also used by the TFLite and QNN comparisons) -------
def write_calibration_npz(cache_dir: Path, path: Path) -> InputSet:
    """Every row of the cache's recording, written once as an .npz keyed by ONNX input name; returns it."""
    recording = CalibrationCache.open(cache_dir).recording()
    data = recording.spread_rows(recording.rows)  # every row, in recording order
    if data.count != recording.rows:
        raise RuntimeError(f"{cache_dir}: read {data.count} of {recording.rows} recorded rows")
    with open(path, "wb") as f:
        np.savez(f, **data.arrays)
    return data


def row_batches(data: InputSet, batch: int) -> list[dict[str, np.ndarray]]:
    """The rows as feeds of `batch` rows (inputs without a batch axis passed whole with each)."""
    return [feed for _, feed in data.batches(batch)]


def float_nodes(artifact: Path) -> list[str]:
    """Names of the float model's nodes that qcompile kept float in `artifact` (its exclusion patterns,
    matched on node name or module path as qcompile matches them): the list a peer's exclusion option
    needs to keep the same layers float."""
    manifest = Manifest.read(artifact)
    if manifest.quantization is None:  # a float artifact (tflite-fp32): nothing was quantized
        return []
    patterns = [re.compile(p) for p in manifest.quantization.exclusion_patterns]
    return [n.name for n in load_graph(manifest.fp32_path(artifact)).nodes if is_excluded(n, patterns)]


def quantized_activations(model: Path) -> int:
    """QuantizeLinear nodes on activations (not on weights) in a Q/DQ ONNX file: how much of the graph a
    method really quantizes, counted the same way for every method."""
    import onnx

    graph = onnx.load(str(model), load_external_data=False).graph
    constants = {t.name for t in graph.initializer}
    constants |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    return sum(n.op_type == "QuantizeLinear" and n.input[0] not in constants for n in graph.node)


def untie_initializers(src: Path, dst: Path) -> Path:
    """The same model with every initializer renamed `qc_init_<i>` and each use given its own copy.

    onnxruntime's quantizer clones a shared initializer as name + "1", which collides with the dynamo
    exporter's `val_N` names and aborts ("shared mode is not supported for weight"); an untied copy
    is the same function with the same node names, so the comparison and the exclusions stay exact."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    del model.graph.initializer[:]
    count = 0
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in inits:
                new = f"qc_init_{count}"
                count += 1
                model.graph.initializer.append(numpy_helper.from_array(inits[name], new))
                node.input[i] = new
    onnx.save_model(model, str(dst), save_as_external_data=True, location=dst.name + ".data", size_threshold=1024)
    return dst


class FeedReader:
    """onnxruntime's CalibrationDataReader over a list of feeds (built lazily: the import is optional)."""

    def __new__(cls, feeds: Sequence[dict[str, np.ndarray]]):
        from onnxruntime.quantization import CalibrationDataReader

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.it = iter(feeds)

            def get_next(self):
                return next(self.it, None)

        return Reader()


# --- the peers --------------------------------------------------------------------------------------
def ort_quantize_static(fp32: Path, out: Path, data: InputSet, exclude: list[str] | None) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    fp32 = untie_initializers(fp32, out.with_name("untied.onnx"))
    quantize_static(str(fp32), str(out), FeedReader(row_batches(data, 32)), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    nodes_to_exclude=exclude, use_external_data_format=True)


def modelopt_quantize(fp32: Path, out: Path, data: InputSet, exclude: list[str] | None) -> None:
    from modelopt.onnx.quantization import quantize

    # ModelOpt reads each entry as a regular expression matched at the start of a node name: the bare
    # name `node_conv2d` would also exclude node_conv2d_1 ... node_conv2d_47, every Conv of the model.
    patterns = None if exclude is None else [re.escape(name) + "$" for name in exclude]
    quantize(onnx_path=str(fp32), quantize_mode="int8", calibration_data=dict(data.arrays), calibration_method="max",
             output_path=str(out), calibration_eps=["cpu"], high_precision_dtype="fp32",
             nodes_to_exclude=patterns, use_external_data_format=True)


PEERS: dict[str, tuple[str, Callable]] = {
    "ort": ("onnxruntime quantize_static (QDQ, per-channel, U8S8)", ort_quantize_static),
    "modelopt": ("NVIDIA ModelOpt ONNX int8 (max)", modelopt_quantize),
}


def wrap_as_artifact(reference_artifact: Path, model: Path, folder: Path, *, target: str | None = None) -> None:
    """An artifact folder for a peer's model file: qcompile's float model and manifest, one bucket
    over the whole timestep range holding the peer's files (`target` overrides the manifest's)."""
    folder.mkdir(parents=True, exist_ok=True)
    manifest = Manifest.read(reference_artifact)
    fp32 = manifest.fp32_path(reference_artifact)
    shutil.copytree(fp32.parent, folder / fp32.parent.relative_to(reference_artifact), dirs_exist_ok=True)
    files = [model.name] + sorted(p.name for p in model.parent.iterdir()
                                  if p != model and p.is_file() and not p.name.startswith("untied"))
    for f in files:
        shutil.copy2(model.parent / f, folder / f)
    lo, hi = manifest.buckets[0].timestep_range[0], manifest.buckets[-1].timestep_range[1]
    bucket = BucketRecord(index=0, timestep_range=(lo, hi), calibration_timesteps=(), files=tuple(files))
    dataclasses.replace(manifest, buckets=(bucket,), target=target or manifest.target,
                        sdk_files=()).write(folder)


def judge(folder: Path, adapter, manifest: Manifest, per_class: int, validate: int) -> dict:
    """The peer artifact judged exactly as qcompile's build judged its own (same held-out inputs, same
    sampling settings), with no thresholds."""
    rep = evaluate_artifact(folder, adapter, held_out=held_out_inputs(adapter, validate, manifest.source.seed),
                            thresholds=Thresholds(eps_sqnr_db_mean=None, sample_psnr_db=None),
                            fidelity=FidelitySettings(per_class=per_class))
    return rep["summary"]


def qcompile_rows(model: str, out: Path, cache: Path, *, calib: str | None, extras: Sequence[str], per_class: int,
                  target: str = "ort-int8", more: Sequence[str] = (),
                  export: Path | None = None) -> tuple[list[dict], list[Path]]:
    """Build one qcompile artifact per entry of `extras` on one cache and one export (`export`, else
    the first build's); their rows."""
    rows, folders = [], []
    for i, extra in enumerate(extras):
        t0 = time.perf_counter()
        folder = out / f"qcompile-{target}-{i}"
        args = ["build", model, "--target", target, "--out", str(folder), "--calib-cache", str(cache),
                "--per-class", str(per_class), "--min-sqnr-db", "-1000", "--min-psnr-db", "-1000", *more]
        args += ["--calib", calib] if calib else []
        args += ["--from-export", str(export)] if export else []
        code = qcompile_main([*args, *shlex.split(extra)])
        if code not in (0, None):
            raise SystemExit(f"qcompile build {extra!r} exited {code}")
        manifest = Manifest.read(folder)
        summary = json.loads((folder / "report.json").read_text())["summary"]
        quantized = manifest.precision != "fp32"
        rows.append({**summary, "method": " ".join(["qcompile", target, *shlex.split(extra)]),
                     "float_nodes": len(float_nodes(folder)) if quantized else None,
                     "quantized_activations": quantized_activations(manifest.bucket_files(folder)[0])
                     if target == "ort-int8" else None,
                     "calibration_rows": manifest.calibration.rows if quantized and manifest.calibration else None,
                     "seconds": round(time.perf_counter() - t0, 1)})
        folders.append(folder)
        export = export or folder
    return rows, folders


def headline(rows: list[dict], ours: str, metric: str) -> dict | None:
    """qcompile's row `ours` against the best like-for-like peer on `metric` (None without one)."""
    mine = next((r for r in rows if r["method"] == ours and r.get(metric) is not None), None)
    peers = [r for r in rows if r.get("like_for_like") and r.get(metric) is not None]
    if mine is None or not peers:
        return None
    best = max(peers, key=lambda r: r[metric])
    return {"metric": metric, "qcompile": mine["method"], "qcompile_value": mine[metric], "peer": best["method"],
            "peer_value": best[metric], "margin": round(mine[metric] - best[metric], 2)}


def run(args) -> dict:
    cache = args.out / "calib-cache"
    args.out.mkdir(parents=True, exist_ok=True)
    rows, folders = qcompile_rows(args.model, args.out, cache, calib=args.calib, extras=args.qcompile_args,
                                  per_class=args.per_class)
    ours = folders[0]
    manifest = Manifest.read(ours)
    src = manifest.source
    adapter = resolve_model(src.model, src.component, seed=src.seed)
    data = write_calibration_npz(cache, args.out / NPZ)
    exclude = float_nodes(ours)
    for key in args.peers:
        name, quantize = PEERS[key]
        for like in (False, True):
            t0 = time.perf_counter()
            label = f"{name}, " + ("qcompile's float layers" if like else "as shipped")
            work = args.out / f"peer-{key}-{'like' if like else 'shipped'}"
            shutil.rmtree(work, ignore_errors=True)
            (work / "raw").mkdir(parents=True)
            base = {"method": label, "like_for_like": like, "float_nodes": len(exclude) if like else 0,
                    "calibration_rows": data.count}
            try:
                quantize(manifest.fp32_path(ours), work / "raw" / "model.onnx", data, exclude if like else None)
            except ImportError as exc:
                print(f"[peers] {name}: not installed ({exc.name}); skipped")
                break
            except Exception as exc:  # noqa: BLE001 - a peer failing on a diffusers graph is a result worth reporting
                print(f"[peers] {label} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
                rows.append({**base, "method": f"{label} (failed: {type(exc).__name__})"})
                continue
            wrap_as_artifact(ours, work / "raw" / "model.onnx", work / "artifact")
            summary = judge(work / "artifact", adapter, manifest, args.per_class, args.validate)
            rows.append({**summary, **base, "quantized_activations": quantized_activations(work / "raw" / "model.onnx"),
                         "seconds": round(time.perf_counter() - t0, 1)})
    metric = "sample_psnr_db" if any(r.get("sample_psnr_db") is not None for r in rows) else "eps_sqnr_db_mean"
    result = {"model": args.model, "rows": rows, "calibration_rows": data.count, "float_nodes": exclude,
              "headline": headline(rows, rows[0]["method"], metric)}
    text = write_table(args.out, rows, COLUMNS, extra={k: v for k, v in result.items() if k != "rows"})
    print(text)
    if result["headline"]:
        print(describe_headline(result["headline"]))
    return result


def describe_headline(h: dict) -> str:
    return (f"{h['qcompile']} vs the best like-for-like peer ({h['peer']}): {h['qcompile_value']:.2f} vs "
            f"{h['peer_value']:.2f} {h['metric']} ({h['margin']:+.2f})")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:reference")
    ap.add_argument("--out", type=Path, default=Path("out/peers"))
    ap.add_argument("--calib", default=None, help="qcompile's --calib: the recording every method calibrates on")
    ap.add_argument("--per-class", type=int, default=20, help="samples per class for models that sample")
    ap.add_argument("--validate", type=int, default=8, help="held-out inputs (models without a sampler)")
    ap.add_argument("--peers", nargs="+", default=list(PEERS), choices=list(PEERS))
    ap.add_argument("--qcompile-args", nargs="+", default=["", "--full-integer"],
                    help="one qcompile row per entry: extra build options (quoted); the first is the headline's")
    return run(ap.parse_args(argv))


def write_table(out: Path, rows: list[dict], columns: Sequence[str], *, extra: dict | None = None,
                name: str = "peers") -> str:
    """NAME.md (a markdown table of `columns`) and NAME.json (every field, plus `extra`) in `out`."""
    text = markdown_table(rows, columns)
    (out / f"{name}.md").write_text(text + "\n")
    (out / f"{name}.json").write_text(json.dumps({"rows": rows, **(extra or {})}, indent=2, default=str))
    return text


def markdown_table(rows: list[dict], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.2f}"
    return str(v)


if __name__ == "__main__":
    main()
