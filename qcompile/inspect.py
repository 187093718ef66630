"""`qcompile inspect`: what is in an artifact folder or an ONNX file, without loading weights."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx

from qcompile.artifact import MANIFEST, REPORT_JSON, read_manifest
from qcompile.errors import UserError


def inspect_path(path: Path) -> str:
    path = Path(path)
    if path.is_dir() and (path / "meta.json").is_file():
        from qcompile.calibration.cache import CalibrationCache

        return CalibrationCache.open(path).summary()
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
    m = read_manifest(folder)
    src = m.get("source", {})
    lines = [f"{folder}: target {m.get('target')} {m.get('precision', '')}, qcompile {m.get('qcompile_version')}",
             f"  source {src.get('model')} ({src.get('class')}, {src.get('family')})"]
    exp = m.get("export", {})
    lines.append(f"  export {exp.get('exporter')} opset {exp.get('opset')}, max abs diff vs torch "
                 f"{exp.get('max_abs_diff_vs_torch')}")
    for b in m.get("buckets", []):
        lines.append(f"  bucket {b['index']}: timesteps {b['timestep_range']} -> {', '.join(b['files'])}")
    q = m.get("quantization")
    if q:
        lines.append(f"  {q['quantized_weights']} quantized weights, {q['quantized_activations']} activations, "
                     f"{len(q['float_layers'])} float layers")
    report = folder / REPORT_JSON
    if report.is_file():
        s = json.loads(report.read_text())["summary"]
        lines.append("  report: " + ", ".join(f"{k} {v}" for k, v in s.items() if v is not None))
    return "\n".join(lines)
