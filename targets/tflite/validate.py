"""Check a .tflite artifact against its contract: onnxruntime running the same Q/DQ graph.

Integer kernels round through fixed-point multipliers where onnxruntime's reference Q/DQ computes in
float, so a quantized output may differ by one step of its scale (one LSB) where a value sits on a
rounding boundary; more than that means the lowering changed the computation. The measure is the
difference in LSBs of the output scale and the fraction of elements that differ at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_graphsurgeon as gs

from qcompile.graph_io import constant_values
from qcompile.runtime import make_session
from qcompile.targets.tflite.runner import TfliteRunner


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
    n = max(len(inputs[k]) for k in batched)
    parts = []
    for start in range(0, n, batch):
        count = min(batch, n - start)
        chunk = dict(inputs)
        for k in batched:
            v = inputs[k][start:start + count]
            chunk[k] = np.concatenate([v, np.repeat(v[-1:], batch - count, axis=0)]) if count < batch else v
        parts.append(session.run(None, chunk)[0][:count])
    return np.concatenate(parts)


def compare_with_qdq(qdq_onnx: Path, tflite: Path, feed: dict[str, np.ndarray], *, batch: int,
                     scale: float | None) -> tuple[np.ndarray, np.ndarray, LsbAgreement | None]:
    """(onnxruntime output, LiteRT output, LSB agreement when the output is quantized with `scale`)."""
    reference = run_onnx_static(qdq_onnx, feed, batch)
    test = TfliteRunner([tflite]).run(feed)
    return reference, test, None if scale is None else lsb_agreement(reference, test, scale)
