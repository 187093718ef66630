"""Check a .tflite artifact against its contract: onnxruntime running the same Q/DQ graph.

Integer kernels round through fixed-point multipliers where onnxruntime's reference Q/DQ computes in
float, so a quantized output may differ by one step of its scale (one LSB) where a value sits on a
rounding boundary; more than that means the lowering changed the computation. The measure is the
difference in LSBs of the output scale and the fraction of elements that differ at all.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_graphsurgeon as gs

from qcompile.graph_io import constant_values
from qcompile.runtime import make_session
from qcompile.targets.tflite.runner import TfliteRunner, static_chunks


@dataclass(frozen=True)
class LsbAgreement:
    scale: float
    max_lsb: float  # largest difference, in steps of the output scale
    fraction_differ: float  # elements that differ by half a step or more

    def as_dict(self) -> dict[str, float]:
        return {"scale": self.scale, "max_lsb": round(self.max_lsb, 3), "fraction_differ": self.fraction_differ}


def lsb_agreement(reference: np.ndarray, test: np.ndarray, scale: float) -> LsbAgreement:
    steps = np.abs(np.asarray(test, np.float64) - np.asarray(reference, np.float64)) / float(scale)
    return LsbAgreement(float(scale), float(steps.max(initial=0.0)), float(np.mean(steps >= 0.5)))


def output_scale(graph: gs.Graph, index: int = 0) -> float | None:
    """Scale of the DequantizeLinear that produces graph output `index` (None for a float output)."""
    producers = graph.outputs[index].inputs
    if not producers or producers[0].op != "DequantizeLinear":
        return None
    scale = constant_values(producers[0].inputs[1])
    return None if scale is None or scale.size != 1 else float(scale.reshape(-1)[0])


def run_onnx_static(path: Path, feed: dict[str, np.ndarray], batch: int, *, optimize: bool = False) -> np.ndarray:
    """First output of a static-batch ONNX model over a larger batch, in chunks of `batch`.

    Unoptimized by default: that runs the Q/DQ graph as written (float ops between exact Q and DQ).
    Optimized, onnxruntime fuses it into its own int8 kernels, whose x86 s8s8 paths can saturate
    (a Q/DQ tiny PixArt drops to cosine 0.995 against its unfused self), so they are no reference.
    """
    session = make_session(path, optimize=optimize)
    inputs = {i.name: np.asarray(feed[i.name]) for i in session.get_inputs()}
    # Batched inputs lead with the model's batch; others (Flux's position ids, say) pass whole.
    batched = {i.name for i in session.get_inputs() if i.shape and i.shape[0] == batch}
    chunks = static_chunks(inputs, batch, batched)
    return np.concatenate([session.run(None, chunk)[0][:count] for chunk, count in chunks])


def compare_with_qdq(qdq_onnx: Path, tflite: Path, feed: dict[str, np.ndarray], *, batch: int,
                     scale: float | None) -> tuple[np.ndarray, np.ndarray, LsbAgreement | None]:
    """(onnxruntime output, LiteRT output, LSB agreement when the output is quantized with `scale`)."""
    reference = run_onnx_static(qdq_onnx, feed, batch)
    test = TfliteRunner([tflite]).run(feed)
    return reference, test, None if scale is None else lsb_agreement(reference, test, scale)


@dataclass(frozen=True)
class TensorAgreement:
    """The int8 values one QuantizeLinear output takes in the interpreter and in onnxruntime.

    `local_*`: onnxruntime fed the interpreter's own values for every upstream int8 tensor, so only the
    ops between them and this tensor are compared (what the lowering is responsible for).
    `max_lsb` / `fraction_differ`: both run end to end from the same float inputs, where one-LSB
    differences early on propagate and grow through the layers that follow.
    """

    name: str
    local_max_lsb: int
    local_fraction_differ: float
    max_lsb: int
    fraction_differ: float

    def as_dict(self) -> dict[str, object]:
        return {"name": self.name, "local_max_lsb": self.local_max_lsb,
                "local_fraction_differ": round(self.local_fraction_differ, 6), "max_lsb": self.max_lsb,
                "fraction_differ": round(self.fraction_differ, 6)}


def quantized_tensor_agreement(tflite: Path, key: str, qdq_onnx: Path, quantized: list, feed: dict[str, np.ndarray],
                               *, batch: int) -> list[TensorAgreement]:
    """Every int8 activation of signature `key` (`quantized`: [onnx name, subgraph, tensor index, perm]
    as the lowering recorded them) against the same QuantizeLinear output of the Q/DQ graph run
    unoptimized in onnxruntime, on the same inputs: end to end, and locally (see TensorAgreement).
    Differences are whole LSBs of the tensor's scale. Inputs run in static-batch chunks, the last one
    padded alike on both sides, and whole chunks are compared (some tensors lead with batch x heads);
    only running counts are kept, so memory stays at one chunk's tensors. The end-to-end and the local
    comparison run one after the other, each with its own onnxruntime session, so only one is open at
    a time (the interpreter runs once for each): for SD 1.5's UNet at 64x64 latents the check's peak
    on one row went from 8.01 to 7.13 GiB."""
    names = [q[0] for q in quantized]
    if not names:  # nothing to compare (and onnxruntime's run([]) would return every output)
        return []
    interpreter = _Interpreted(tflite, key, quantized)
    counts = {n: np.zeros(5, np.int64) for n in names}  # local max, local differing, e2e max, e2e differing, size
    batched = {n for n, spec in interpreter.inputs.items() if spec["shape"] and spec["shape"][0] == batch}
    for injected, at in ((False, 2), (True, 0)):
        session = _probe_session(qdq_onnx, names, injected=injected)
        for chunk, _ in static_chunks({n: np.asarray(feed[n]) for n in interpreter.inputs}, batch, batched):
            test = interpreter.run(chunk)
            onnx_feed = {i.name: chunk[i.name] for i in session.get_inputs() if not i.name.endswith(INJECTED)}
            if injected:
                onnx_feed.update({n + INJECTED: test[n] for n in names})
            for n, onnx in zip(names, session.run(names, onnx_feed), strict=True):
                t = test[n].astype(np.int32)
                d, c = np.abs(onnx.astype(np.int32) - t), counts[n]
                c[at], c[at + 1] = max(c[at], int(d.max(initial=0))), c[at + 1] + int(np.count_nonzero(d))
                if not injected:
                    c[4] += t.size
        del session
    return [TensorAgreement(n, int(c[0]), float(c[1] / max(c[4], 1)), int(c[2]), float(c[3] / max(c[4], 1)))
            for n, c in counts.items()]


INJECTED = "/injected"


def _probe_session(path: Path, names: list[str], *, injected: bool):
    """The Q/DQ graph, unoptimized, with the QuantizeLinear outputs `names` as outputs. With `injected`,
    every reader of those tensors reads a graph input `<name>/injected` instead (the Q nodes still
    compute their own outputs), so each output depends only on its nearest upstream int8 tensors."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    model.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.INT8, None) for n in names)
    if injected:
        wanted = set(names)
        for node in model.graph.node:
            for i, name in enumerate(node.input):
                if name in wanted:
                    node.input[i] = name + INJECTED
        model.graph.input.extend(onnx.helper.make_tensor_value_info(n + INJECTED, onnx.TensorProto.INT8, None)
                                 for n in names)
    # Beside the original, so its external data resolves; a unique name, so two checks never collide.
    fd, probe = tempfile.mkstemp(prefix=".probe-", suffix=".onnx", dir=path.parent)
    os.close(fd)
    try:
        onnx.save(model, probe)
        return make_session(Path(probe), optimize=False)
    finally:
        Path(probe).unlink(missing_ok=True)


class _Interpreted:
    """One signature of a .tflite run with its int8 tensors kept; they are read back in ONNX layout.

    The tensors are made outputs of a copy of the file (`emit.with_outputs`), so the interpreter keeps
    them and nothing else: XNNPACK runs the partitions it runs in the artifact, each int8 tensor an
    output of one. (Keeping every tensor instead held all float intermediates at once: 9.9 GB for SD
    1.5's int8 UNet at 64x64 latents.)"""

    def __init__(self, path: Path, key: str, quantized: list):
        from qcompile.targets.tflite import deps
        from qcompile.targets.tflite.emit import with_outputs
        from qcompile.targets.tflite.runner import THREADS, read_metadata

        data = Path(path).read_bytes()
        signature = read_metadata(data)["signatures"][key]
        self.inputs = {i["name"]: i for i in signature["inputs"]}
        subgraph = quantized[0][1] if quantized else int(signature.get("subgraph", 0))  # one signature: one subgraph
        probe = with_outputs(data, subgraph, [index for _, _, index, _ in quantized])
        del data
        self.interpreter = deps.interpreter_module().Interpreter(model_content=probe, num_threads=THREADS)
        self.runner = self.interpreter.get_signature_runner(key)
        self.quantized = quantized

    def run(self, chunk: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from qcompile.targets.tflite.layout import invert

        self.runner(**{n: np.ascontiguousarray(np.transpose(chunk[n].astype(s["dtype"]), s["perm"]))
                       for n, s in self.inputs.items()})
        return {name: np.transpose(self.interpreter.get_tensor(index, subgraph), invert(tuple(perm)))
                for name, subgraph, index, perm in self.quantized}
