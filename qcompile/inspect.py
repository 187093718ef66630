"""`qcompile inspect`: what is in an artifact folder or an ONNX file, without loading weights."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx

from qcompile.artifact import REPORT_JSON
from qcompile.errors import UserError
from qcompile.manifest import MANIFEST, Manifest


def inspect_path(path: Path, plot: Path | None = None) -> str:
    path = Path(path)
    if path.is_dir() and (path / "meta.json").is_file():
        return inspect_cache(path, plot)
    if plot is not None:
        raise UserError(f"--plot: only a calibration cache can be plotted, and {path} is not one")
    if path.is_dir():
        return inspect_artifact(path)
    if path.suffix == ".onnx":
        return inspect_onnx(path)
    raise UserError(f"{path}: expected an artifact folder (with {MANIFEST}) or an .onnx file")


def graph_stats(path: Path) -> dict[str, object]:
    if not path.is_file():
        raise UserError(f"{path}: no such ONNX file")
    model = onnx.load(str(path), load_external_data=False)
    g = model.graph
    ops = Counter(n.op_type for n in g.node)
    weight_bytes = Counter()
    for t in g.initializer:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        weight_bytes[onnx.TensorProto.DataType.Name(t.data_type)] += int(np.prod(t.dims, dtype=np.int64)) * itemsize
    return {
        "nodes": len(g.node),
        "ops": dict(ops.most_common()),
        "inputs": [(i.name, [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim]) for i in g.input],
        "outputs": [o.name for o in g.output],
        "initializers": len(g.initializer),
        "weight_bytes_by_dtype": dict(weight_bytes),
        "opset": {o.domain or "ai.onnx": o.version for o in model.opset_import},
    }


def inspect_onnx(path: Path) -> str:
    s = graph_stats(path)
    lines = [f"{path}: {s['nodes']} nodes, {s['initializers']} initializers, opset {s['opset']}"]
    lines += [f"  input  {name} {shape}" for name, shape in s["inputs"]]
    lines += [f"  output {name}" for name in s["outputs"]]
    lines.append("  weights: " + ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in s["weight_bytes_by_dtype"].items()))
    lines.append("  ops: " + ", ".join(f"{op} {n}" for op, n in s["ops"].items()))
    return "\n".join(lines)


def inspect_artifact(folder: Path) -> str:
    m = Manifest.read(folder)
    src = m.source
    lines = [f"{folder}: target {m.target} {m.precision}, qcompile {m.qcompile_version}",
             f"  source {src.model} ({src.class_name}, {src.family})"]
    exp = m.export
    lines.append(f"  export {exp.exporter} opset {exp.opset}, max abs diff vs torch {exp.max_abs_diff_vs_torch}")
    for b in m.buckets:
        lines.append(f"  bucket {b.index}: timesteps {list(b.timestep_range)} -> {', '.join(b.files)}")
    q = m.quantization
    if q is not None:
        wide = f", {len(q.wide_layers)} layers at wide activations" if q.wide_layers else ""
        lines.append(f"  {q.quantized_weights} quantized weights, {q.quantized_activations} activations, "
                     f"{len(q.float_layers)} float layers{wide}")
    report = folder / REPORT_JSON
    if report.is_file():
        s = json.loads(report.read_text())["summary"]
        lines.append("  report: " + ", ".join(f"{k} {v}" for k, v in s.items() if v is not None))
    return "\n".join(lines)


def range_variation(table, top: int = 8) -> list[tuple[str, np.ndarray]]:
    """The tensors whose absmax range varies most across timesteps (max/min ratio), with their curves."""
    curves = []
    for name, st in table.tensors.items():
        amax = np.maximum(np.abs(st.lo), np.abs(st.hi))
        ok = np.isfinite(amax) & (amax > 0)
        if ok.sum() >= 2:
            curves.append((float(amax[ok].max() / amax[ok].min()), name, amax))
    curves.sort(key=lambda c: -c[0])
    return [(name, amax) for _, name, amax in curves[:top]]


def inspect_cache(folder: Path, plot: Path | None) -> str:
    from qcompile.calibration.cache import CalibrationCache

    cache = CalibrationCache.open(folder)
    table = cache.table()
    lines = [cache.summary()]
    labels = {t["name"]: f"{t['name']}: {t.get('producer') or '?'}" for t in cache.meta["tensors"]}
    varying = [(labels.get(name, name), amax) for name, amax in range_variation(table)]
    if varying and not np.isnan(table.timesteps).all():
        lines.append("  ranges that vary most with the timestep (absmax max/min):")
        for label, amax in varying:
            lines.append(f"    {amax.max() / amax.min():6.2f}x  {label}")
    if plot is not None:
        _plot_ranges(table.timesteps, varying, plot)
        lines.append(f"  plot: {plot}")
    return "\n".join(lines)


def _plot_ranges(timesteps: np.ndarray, varying, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from qcompile.atomic import atomic_path

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    order = np.argsort(timesteps)
    for name, amax in varying:
        ax.plot(timesteps[order], amax[order], marker=".", label=name[-60:])
    ax.set_yscale("log")
    ax.set_xlabel("timestep")
    ax.set_ylabel("activation absmax")
    ax.set_title("Activation range against timestep (tensors that vary most)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
