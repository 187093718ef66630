"""AIMET-style quantization encodings (format 1.0.0) for the float device graph, one file per bucket.

QNN SDK users convert the float ONNX themselves (`qnn-onnx-converter --quantization_overrides`), so
the scales qcompile calibrated per timestep bucket travel as encodings keyed by the float graph's
tensor names:
    {"version": "1.0.0",
     "activation_encodings": [{"name", "bw", "dtype": "INT", "enc_type": "PER_TENSOR", "is_sym",
                               "scale": [s], "offset": [o]}, ...],
     "param_encodings": [... "enc_type": "PER_CHANNEL" with one scale/offset per output channel ...]}
Offsets follow AIMET's (QNN's) convention on the unsigned grid, real = scale * (q + offset): a uint8
zero point 128 is offset -128, and a symmetric int8 weight (zero point 0) is offset -128 too, not 0
(aimet_onnx's 1.0.0 exporter writes the unsigned form; its importer subtracts qmin again). Biases are
left out: the converter derives int32 bias encodings from the input and weight scales, as we do.
The encodings are read off the Q/DQ graph itself, so they cannot drift from what was validated. A
DequantizeLinear -> QuantizeLinear pair (`wide_graph_outputs`' uint8 -> uint16 Convert before an output
op) names no tensor of the float graph: the 16-bit output encoding and the 8-bit one of the op's input
say it, and the converter places the Convert between them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from qcompile.atomic import write_json
from qcompile.graph_io import constant_values
from qcompile.passes.insert_qdq_integer import unrenamed

VERSION = "1.0.0"


def _entry(name: str, scale: np.ndarray, zero: np.ndarray, *, channel: bool) -> dict[str, Any]:
    zero = np.asarray(zero)
    return {
        "name": name,
        "bw": int(zero.dtype.itemsize * 8),
        "dtype": "INT",
        "enc_type": "PER_CHANNEL" if channel else "PER_TENSOR",
        "is_sym": bool(np.issubdtype(zero.dtype, np.signedinteger) and not np.any(zero)),
        "scale": [float(s) for s in np.asarray(scale, np.float64).reshape(-1)],
        "offset": [int(np.iinfo(zero.dtype).min) - int(z) for z in zero.astype(np.int64).reshape(-1)],
    }


def encodings(qdq: gs.Graph, float_graph: gs.Graph) -> dict[str, Any]:
    outputs = {t.name for t in qdq.outputs}
    activations: dict[str, dict[str, Any]] = {}
    for node in qdq.nodes:
        if node.op != "QuantizeLinear" or constant_values(src := node.inputs[0]) is not None:
            continue
        if not (src.inputs and src.inputs[0].op == "DequantizeLinear"):  # a Convert names no float tensor
            name = unrenamed(node.inputs[0].name, outputs)  # a graph output, renamed around its Q/DQ pair
            scale, zero = constant_values(node.inputs[1]), constant_values(node.inputs[2])
            activations[name] = _entry(name, scale, zero, channel=False)
    params: dict[str, dict[str, Any]] = {}
    float_nodes = {n.name: n for n in float_graph.nodes}
    for node in qdq.nodes:
        original = float_nodes.get(node.name)
        if original is None:
            continue
        for i, t in enumerate(node.inputs):
            dq = t.inputs[0] if len(t.inputs) == 1 else None
            if dq is None or dq.op != "DequantizeLinear" or constant_values(dq.inputs[0]) is None:
                continue
            zero = constant_values(dq.inputs[2])
            if zero.dtype == np.int32:
                continue  # a bias
            name = original.inputs[i].name
            params[name] = _entry(name, constant_values(dq.inputs[1]), zero, channel=zero.ndim > 0)
    return {"version": VERSION, "activation_encodings": list(activations.values()),
            "param_encodings": list(params.values()), "excluded_layers": []}


def write_encodings(qdq: gs.Graph, float_graph: gs.Graph, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, encodings(qdq, float_graph))
    return path
