"""Activation statistics per tensor per timestep, from replaying a recording through the float graph.

For every tensor a target may quantize (every float activation) and every recorded timestep value:
element count, min, max, per-channel absmax and a histogram. The histogram bins are fixed in
advance (log2-spaced magnitudes, sign kept apart), so statistics computed on separate shards, or on
separate machines, merge exactly by addition; no estimator or target choice is baked in.

One forward pass per batch of recorded rows observes every tensor: the model runs as consecutive
segments (`segments.py`) whose observed outputs for one batch fit a byte budget, so memory stays
bounded by that budget plus the tensors crossing a cut, not by the model's total activation size.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from tqdm import tqdm

from qcompile.calibration.recorder import Recording
from qcompile.calibration.segments import segmented
from qcompile.calibration.shapes import concrete_shapes

# Histogram of |x|: bin 0 holds |x| < 2**LOG2_MIN (zeros included); then BINS_PER_OCTAVE bins per
# octave up to 2**LOG2_MAX; the last bin also takes anything larger.
LOG2_MIN, LOG2_MAX, BINS_PER_OCTAVE = -16, 16, 8
N_BINS = (LOG2_MAX - LOG2_MIN) * BINS_PER_OCTAVE + 1
HISTOGRAM_CHUNK = 1 << 22  # elements binned at a time
EXPOSED_BYTES_BUDGET = 512 << 20
STATS_BATCH = 16  # rows per forward pass while collecting statistics


def bin_edges() -> np.ndarray:
    """Magnitude edges of bins 1..N_BINS-1 (bin i spans edges[i-1]..edges[i])."""
    return 2.0 ** (LOG2_MIN + np.arange(N_BINS) / BINS_PER_OCTAVE)


def magnitude_histogram(x: np.ndarray) -> np.ndarray:
    """(2, N_BINS) counts: row 0 negative values, row 1 positive (and zero) values.

    Computed HISTOGRAM_CHUNK elements at a time: the binning's temporaries take about 30 bytes per
    element, 4 GB for one attention-score tensor of an SD UNet at 64x64 latents (512 MiB), where a
    chunk takes 120 MB. Counts add exactly, so the result does not depend on the chunking."""
    flat = x.ravel()
    counts = np.zeros((2, N_BINS), np.int64)
    for start in range(0, flat.size, HISTOGRAM_CHUNK):
        part = flat[start:start + HISTOGRAM_CHUNK]
        # Magnitudes below the first edge (zeros included) are floored to land in bin 0 without a log of 0.
        mag = np.maximum(np.abs(part, dtype=np.float32), np.float32(2.0 ** (LOG2_MIN - 1)))
        idx = np.floor((np.log2(mag) - LOG2_MIN) * BINS_PER_OCTAVE).astype(np.int64) + 1
        idx = np.clip(idx, 0, N_BINS - 1)
        neg = part < 0
        counts[0] += np.bincount(idx[neg], minlength=N_BINS)
        counts[1] += np.bincount(idx[~neg], minlength=N_BINS)
    return counts


@dataclass(eq=False)
class TensorStats:
    """One tensor's statistics, one row per timestep of `StatsTable.timesteps`."""

    channel_axis: int
    count: np.ndarray  # (T,) int64 elements seen
    lo: np.ndarray  # (T,) float32
    hi: np.ndarray  # (T,) float32
    chan_absmax: np.ndarray  # (T, C) float32
    hist: np.ndarray  # (T, 2, N_BINS) int64

    @classmethod
    def empty(cls, timesteps: int, channels: int, channel_axis: int) -> TensorStats:
        return cls(channel_axis, np.zeros(timesteps, np.int64), np.full(timesteps, np.inf, np.float32),
                   np.full(timesteps, -np.inf, np.float32), np.zeros((timesteps, channels), np.float32),
                   np.zeros((timesteps, 2, N_BINS), np.int64))

    def observe(self, t: int, x: np.ndarray) -> None:
        if x.size == 0:
            return
        self.count[t] += x.size
        self.lo[t] = min(self.lo[t], float(x.min()))
        self.hi[t] = max(self.hi[t], float(x.max()))
        axis = self.channel_axis % x.ndim if x.ndim else 0
        if x.ndim:
            rows = np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)
            per_channel = np.maximum(rows.max(axis=1), -rows.min(axis=1))  # max |x| without an |x| copy
            if per_channel.shape[0] == self.chan_absmax.shape[1]:
                np.maximum(self.chan_absmax[t], per_channel, out=self.chan_absmax[t])
        self.hist[t] += magnitude_histogram(x)


@dataclass(eq=False)
class StatsTable:
    timesteps: np.ndarray  # (T,) float, descending; NaN for models without a timestep
    tensors: dict[str, TensorStats]

    def merge(self, other: StatsTable) -> StatsTable:
        """Exact merge of statistics computed on separate shards (union of timesteps)."""
        ts = np.union1d(_key(self.timesteps), _key(other.timesteps))[::-1]
        out: dict[str, TensorStats] = {}
        for name in sorted(set(self.tensors) | set(other.tensors)):
            parts = [(tab, tab.tensors[name]) for tab in (self, other) if name in tab.tensors]
            first = parts[0][1]
            merged = TensorStats.empty(len(ts), first.chan_absmax.shape[1], first.channel_axis)
            for tab, st in parts:
                idx = np.searchsorted(-ts, -_key(tab.timesteps))
                merged.count[idx] += st.count
                merged.lo[idx] = np.minimum(merged.lo[idx], st.lo)
                merged.hi[idx] = np.maximum(merged.hi[idx], st.hi)
                merged.chan_absmax[idx] = np.maximum(merged.chan_absmax[idx], st.chan_absmax)
                merged.hist[idx] += st.hist
            out[name] = merged
        return StatsTable(_unkey(ts), out)


def _key(ts: np.ndarray) -> np.ndarray:
    """NaN (no timestep) sorts as -1 so set operations work."""
    return np.where(np.isnan(ts), -1.0, ts)


def _unkey(ts: np.ndarray) -> np.ndarray:
    return np.where(ts == -1.0, np.nan, ts)


def quantizable_tensors(graph: gs.Graph) -> list[str]:
    """Every float32 activation (graph inputs and node outputs), in graph order. Other float types
    (Flux computes its rotary embedding in float64) are never quantized and are left out."""
    names: dict[str, None] = {}
    outputs = {t.name for t in graph.outputs}
    for t in graph.inputs:
        if _is_float32(t):
            names[t.name] = None
    for node in graph.nodes:
        if node.op in ("QuantizeLinear", "DequantizeLinear", "Constant", "Shape"):
            continue
        for t in node.outputs:
            if _is_float32(t) and (t.outputs or t.name in outputs):
                names[t.name] = None
    return list(names)


def _is_float32(t: gs.Tensor) -> bool:
    return t.dtype is not None and np.dtype(t.dtype) == np.float32


def channel_axis(tensor: gs.Tensor) -> int:
    """The axis a per-channel statistic runs along: 1 for what Conv reads (NCHW), else the last."""
    if any(c.op == "Conv" for c in tensor.outputs):
        return 1
    rank = len(tensor.shape) if tensor.shape is not None else 0
    return 1 if rank == 4 else -1


def observed_row_bytes(onnx_path: Path, recording: Recording, names: Sequence[str]) -> dict[str, int]:
    """Bytes (as float32) of each of `names` per recorded row, at the recording's input shapes: an
    export with symbolic axes has no sizes of its own (see `shapes.py`). A tensor whose size cannot be
    resolved counts as the largest one that can, so a cut never underestimates it."""
    inputs, _ = next(recording.shards())
    shapes = concrete_shapes(onnx.load(str(onnx_path), load_external_data=False), inputs.row_shapes(), names)
    sizes = {n: None if s is None else 4 * math.prod(s) for n, s in shapes.items()}
    largest = max((b for b in sizes.values() if b is not None), default=1 << 20)
    return {n: largest if b is None else b for n, b in sizes.items()}


def _channels(tensor: gs.Tensor, axis: int) -> int:
    shape = tensor.shape
    if not shape:
        return 1
    d = shape[axis % len(shape)]
    return d if isinstance(d, int) and d > 0 else 1


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


def _batches(timestep: np.ndarray, batch: int) -> Iterator[tuple[float, np.ndarray]]:
    """(timestep key, row indices) of one recording file's batches, in the order statistics run them:
    the one order both a whole calibration and its shards (`shards.py`) follow."""
    keys = _key(timestep)
    for t in np.unique(keys):
        rows = np.nonzero(keys == t)[0]
        for start in range(0, len(rows), batch):
            yield float(t), rows[start:start + batch]


def batch_rows(recording: Recording, batch: int = STATS_BATCH) -> list[int]:
    """Rows of each batch `collect_stats` runs, in order (reads only the timestep column)."""
    return [len(idx) for ts in recording.timestep_columns() for _, idx in _batches(ts, batch)]


def collect_stats(onnx_path: Path, graph: gs.Graph, recording: Recording, *, names: Sequence[str] | None = None,
                  batch: int = STATS_BATCH, budget_bytes: int = EXPOSED_BYTES_BUDGET,
                  batches: range | None = None) -> StatsTable:
    """Statistics of `names` (every quantizable tensor by default) over the recording, from one forward
    pass per batch of `batch` rows of one timestep: the model runs segment by segment (see
    `segments.py`), each segment's observed outputs for a batch fitting `budget_bytes`. `batches`: only
    these batches (numbered in run order, see `batch_rows`), for one shard of a calibration; each runs
    exactly as in the whole calibration, so the shards' statistics add up to the whole's bit for bit."""
    names = list(names) if names is not None else quantizable_tensors(graph)
    tensors = graph.tensors()
    timesteps = recording.timesteps()
    t_index = {float(t): i for i, t in enumerate(_key(timesteps))}
    table = {}
    for n in names:
        axis = channel_axis(tensors[n])
        table[n] = TensorStats.empty(len(timesteps), _channels(tensors[n], axis), axis)
    if not names:
        return StatsTable(timesteps, table)
    sizes = batch_rows(recording, batch)
    chosen = range(len(sizes)) if batches is None else batches
    progress = tqdm(total=sum(sizes[i] for i in chosen), desc="statistics", unit="row", leave=False)
    number = 0
    row_bytes = observed_row_bytes(onnx_path, recording, names)
    with segmented(onnx_path, names, lambda n: row_bytes[n] * batch, budget_bytes) as model:
        for inputs, meta in recording.shards():
            for t, idx in _batches(meta.timestep, batch):
                number += 1
                if number - 1 not in chosen:
                    continue
                for values in model.run(inputs.take(idx)):
                    for name, v in values.items():
                        table[name].observe(t_index[t], np.asarray(v, np.float32))
                progress.update(len(idx))
    progress.close()
    return StatsTable(timesteps, table)
