"""Run the float graph in onnxruntime and record per-sample min/max of chosen tensors.

The statistics are kept per sample (so per timestep), not pooled: the estimator and the timestep
buckets decide later how to combine them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from tqdm import tqdm

from qcompile.calibration.inputs import InputSet
from qcompile.runtime import make_session


@dataclass(frozen=True, eq=False)
class MinMaxStats:
    """Per tensor, per sample: `lo[name][i]`, `hi[name][i]` are the extremes seen for sample i."""

    lo: dict[str, np.ndarray]
    hi: dict[str, np.ndarray]
    timesteps: np.ndarray | None


def expose_tensors(onnx_path: Path, names: Sequence[str]) -> Path:
    """A copy of the model (beside it, sharing its external data) with `names` as extra outputs."""
    model = onnx.load(str(onnx_path), load_external_data=False)
    present = {o.name for o in model.graph.output}
    for name in names:
        if name not in present:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    exposed = onnx_path.with_name(f".{onnx_path.stem}.observe.onnx")
    onnx.save_model(model, str(exposed))
    return exposed


def collect_minmax(onnx_path: Path, names: Sequence[str], inputs: InputSet, *, batch: int = 4,
                   desc: str = "calibrating") -> MinMaxStats:
    n = inputs.count
    lo = {k: np.full(n, np.inf, np.float32) for k in names}
    hi = {k: np.full(n, -np.inf, np.float32) for k in names}
    exposed = expose_tensors(onnx_path, names)
    try:
        sess = make_session(exposed)
        for sl, feed in tqdm(list(inputs.batches(batch)), desc=desc, unit="batch", leave=False):
            b = sl.stop - sl.start
            values = sess.run(list(names), feed)
            for name, v in zip(names, values, strict=True):
                lo[name][sl], hi[name][sl] = _per_sample_extremes(np.asarray(v, np.float32), b)
    finally:
        os.unlink(exposed)
    return MinMaxStats(lo, hi, inputs.timesteps)


def _per_sample_extremes(v: np.ndarray, b: int) -> tuple[np.ndarray, np.ndarray]:
    if v.size == 0:
        return np.zeros(b, np.float32), np.zeros(b, np.float32)
    if v.ndim and v.shape[0] % b == 0:
        # Batch is the outermost axis, also where heads were merged into it (B*H, S, D).
        flat = v.reshape(b, -1)
        return flat.min(axis=1), flat.max(axis=1)
    return np.full(b, v.min()), np.full(b, v.max())
