"""Calibration and validation inputs: arrays keyed by ONNX input name, samples stacked on axis 0.

This is the layout NVIDIA ModelOpt's ONNX quantizer reads, so users' files carry over. Each sample
may carry its timestep (the value, not a call counter): the timestep-aware calibration keys its
statistics by it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qcompile.errors import UserError


@dataclass(frozen=True, eq=False)
class InputSet:
    arrays: dict[str, np.ndarray]
    timesteps: np.ndarray | None  # (N,) float, or None for models without a timestep
    # Inputs without a batch axis (Flux's positional ids): passed whole with every batch.
    unbatched: frozenset[str] = frozenset()

    @property
    def count(self) -> int:
        return len(next(v for k, v in self.arrays.items() if k not in self.unbatched))

    def take(self, sl: slice) -> dict[str, np.ndarray]:
        return {k: (v if k in self.unbatched else v[sl]) for k, v in self.arrays.items()}

    def batches(self, batch: int) -> Iterator[tuple[slice, dict[str, np.ndarray]]]:
        for start in range(0, self.count, batch):
            sl = slice(start, min(start + batch, self.count))
            yield sl, self.take(sl)

    def concat(self, other: InputSet) -> InputSet:
        """This set's rows followed by `other`'s (unbatched inputs are taken from this set)."""
        arrays = {k: v if k in self.unbatched else np.concatenate([v, other.arrays[k].astype(v.dtype)])
                  for k, v in self.arrays.items()}
        ts = None if self.timesteps is None else np.concatenate([self.timesteps, other.timesteps])
        return InputSet(arrays, ts, self.unbatched)

    def split(self, first: int) -> tuple[InputSet, InputSet]:
        ts = self.timesteps
        head, tail = slice(0, first), slice(first, None)
        return (InputSet(self.take(head), None if ts is None else ts[head], self.unbatched),
                InputSet(self.take(tail), None if ts is None else ts[tail], self.unbatched))


def spread_timesteps(count: int, scale: float, seed: int) -> np.ndarray:
    """`count` timesteps covering [0, scale) evenly (stratified, jittered by `seed`)."""
    rng = np.random.default_rng(seed)
    edges = np.linspace(0.0, scale, count + 1)
    ts = edges[:-1] + rng.uniform(0, 1, count) * (edges[1:] - edges[:-1])
    return np.floor(ts).astype(np.float32) if scale > 1 else ts.astype(np.float32)


def synthetic_inputs(adapter, count: int, seed: int) -> InputSet:
    """Inputs from the model's config: latents noised to timesteps spread over the schedule."""
    from qcompile.models.base import InputRole, NoiseSchedule

    ts = spread_timesteps(count, adapter.timestep_scale, seed)
    arrays = adapter.synthetic_inputs(ts, seed=seed)
    has_t = adapter.noise_schedule is not NoiseSchedule.NONE and any(
        s.role is InputRole.TIMESTEP for s in adapter.input_specs())
    return InputSet(arrays, ts if has_t else None, unbatched_inputs(adapter))


def unbatched_inputs(adapter) -> frozenset[str]:
    return frozenset(s.name for s in adapter.input_specs() if not s.batched)


def load_npz(path: Path, input_names: Sequence[str], timestep_name: str | None,
             unbatched: frozenset[str] = frozenset()) -> InputSet:
    """The user's own inputs; every ONNX input must be present, all with the same sample count."""
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise UserError(f"--calib {path}: not a readable .npz file ({type(exc).__name__})") from exc
    with data:
        missing = [n for n in input_names if n not in data.files]
        if missing:
            raise UserError(f"--calib {path}: missing arrays for inputs {', '.join(missing)} "
                            f"(found {', '.join(data.files) or 'none'})")
        arrays = {n: np.asarray(data[n]) for n in input_names}
    counts = {n: (a.shape[0] if a.ndim else 0) for n, a in arrays.items() if n not in unbatched}
    if len(set(counts.values())) != 1:
        raise UserError(f"--calib {path}: inputs have different sample counts {counts}")
    if next(iter(counts.values())) == 0:
        raise UserError(f"--calib {path}: holds no samples")
    ts = None
    if timestep_name is not None:
        ts = np.broadcast_to(arrays[timestep_name].reshape(counts[timestep_name], -1)[:, 0],
                             (counts[timestep_name],)).astype(np.float32)
    return InputSet(arrays, ts, unbatched)
