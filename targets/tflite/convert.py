"""ONNX graphs -> one TFLite model: a subgraph and a SignatureDef per graph (per timestep bucket).

Bucket graphs share their weights (the same int8 constants, only activation scales differ), and the
builder stores each distinct constant buffer once, so K buckets cost K sets of operators and biases
but one set of weights. Metadata records how each signature maps back to the ONNX model (names,
layouts, batch), so the runner can present NCHW tensors at its API.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import onnx_graphsurgeon as gs

from qcompile.targets.tflite.builder import ModelBuilder, Signature
from qcompile.targets.tflite.emit import set_metadata, write_tflite
from qcompile.targets.tflite.handlers import HANDLERS
from qcompile.targets.tflite.lower import LoweredGraph, Lowering

METADATA_FORMAT = 1


def lower_graphs(graphs: Sequence[tuple[str, gs.Graph]], *, batch: int,
                 quantized: dict[str, list] | None = None) -> ModelBuilder:
    """Lower each (signature key, graph) into its own subgraph of one model. `quantized`, when given,
    receives per signature the int8 tensors that hold the graph's QuantizeLinear outputs
    ([onnx name, subgraph, tensor index, stored perm]), for validation against onnxruntime."""
    model = ModelBuilder(description="qcompile")
    info = {"format": METADATA_FORMAT, "batch": batch, "signatures": {}}
    for key, graph in graphs:
        lowered: LoweredGraph = Lowering(model, graph, key).run(HANDLERS)
        if quantized is not None:
            quantized[key] = [[name, lowered.subgraph, index, list(perm)] for name, index, perm in lowered.quantized]
        model.signatures.append(Signature(
            key, lowered.subgraph,
            [(i.name, i.tensor) for i in lowered.inputs], [(o.name, o.tensor) for o in lowered.outputs]))
        info["signatures"][key] = {
            "subgraph": lowered.subgraph,  # the bucket order (the metadata's keys are written sorted)
            "inputs": [i.as_dict() for i in lowered.inputs],
            "outputs": [o.as_dict() for o in lowered.outputs],
        }
    set_metadata(model, info)
    return model


def write_model(graphs: Sequence[tuple[str, gs.Graph]], path: Path, *, batch: int,
                external_data: bool | None = None, quantized: dict[str, list] | None = None) -> Path:
    return write_tflite(lower_graphs(graphs, batch=batch, quantized=quantized), path, external_data=external_data)
