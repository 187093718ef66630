"""Calibration and validation inputs: arrays keyed by ONNX input name, samples stacked on axis 0.

This is the layout NVIDIA ModelOpt's ONNX quantizer reads, so users' files carry over. Each sample
may carry its timestep (the value, not a call counter): the timestep-aware calibration keys its
statistics by it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
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

    def row_shapes(self) -> dict[str, tuple[int, ...]]:
        """Each input's shape for one row (inputs without a batch axis whole): what a model's tensor
        sizes per row are computed from."""
        return {k: (tuple(v.shape) if k in self.unbatched else (1, *v.shape[1:])) for k, v in self.arrays.items()}

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


def load_npz(path: Path, specs: Sequence, axes: Mapping[str, Sequence], timestep_name: str | None) -> InputSet:
    """The user's own inputs, as diffusers scripts write them: one array per ONNX input (`specs`, the
    adapter's InputSpecs), samples on axis 0, any numeric dtype. Arrays are cast to the graph's input
    dtype (int64 timesteps from a scheduler, fp16 latents), said once on stdout. Every problem is one
    UserError naming the file, the key, the shape given and the shape expected (`axes`: per input, the
    Axis of each dimension)."""
    where = f"--calib {path}"
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise UserError(f"{where}: not a readable .npz file ({type(exc).__name__})") from exc
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise UserError(f"{where}: a single array, not an .npz archive of arrays keyed by input name")
    names = [s.name for s in specs]
    with data:
        missing = [n for n in names if n not in data.files]
        if missing:
            raise UserError(f"{where}: missing key(s) {', '.join(repr(n) for n in missing)}; this model takes "
                            f"{', '.join(names)} (found {', '.join(data.files) or 'none'})")
        extra = [k for k in data.files if k not in names]
        if extra:
            raise UserError(f"{where}: key(s) {', '.join(repr(k) for k in extra)} are not inputs of this model, "
                            f"which takes {', '.join(names)}")
        try:
            raw = {n: np.asarray(data[n]) for n in names}
        except Exception as exc:  # a truncated member, an object array (pickles are refused)
            raise UserError(f"{where}: cannot read its arrays ({type(exc).__name__}: {exc})".splitlines()[0]) from exc
    casts = []
    arrays = {}
    for spec in specs:
        a = raw[spec.name]
        _check_shape(where, spec, a, axes[spec.name])
        arrays[spec.name] = _cast(where, spec, a)
        if a.dtype != arrays[spec.name].dtype:
            casts.append(f"{spec.name} {a.dtype}->{spec.dtype}")
    _check_shared_axes(where, specs, arrays, axes)
    if casts:
        print(f"[qcompile] {where}: cast to the graph's input dtypes: {', '.join(casts)}", flush=True)
    unbatched = frozenset(s.name for s in specs if not s.batched)
    counts = {n: a.shape[0] for n, a in arrays.items() if n not in unbatched}
    if len(set(counts.values())) != 1:
        raise UserError(f"{where}: inputs have different sample counts {counts}")
    ts = None
    if timestep_name is not None:
        t = arrays[timestep_name]
        ts = t.reshape(len(t), -1)[:, 0].astype(np.float32)
    return InputSet(arrays, ts, unbatched)


def expected_shape(axes: Sequence) -> str:
    """The shape an input takes, for one-line errors: "(N, 4, height, width) with height: ..."."""
    dims = ["N" if a.name == "batch" else (a.name if a.dynamic else str(a.default)) for a in axes]
    limits = [a.describe() for a in axes if a.dynamic and a.name != "batch"]
    return f"({', '.join(dims)})" + (f" with {'; '.join(limits)}" if limits else "")


def _check_shape(where: str, spec, a: np.ndarray, axes: Sequence) -> None:
    """The array's shape must be one the exported graph accepts (N >= 1 samples)."""
    key = f"{where}: key '{spec.name}'"
    if a.size == 0:
        raise UserError(f"{key} is empty (shape {a.shape}); expected {expected_shape(axes)}")
    if a.dtype.kind not in "biuf":
        raise UserError(f"{key} holds {a.dtype} values; expected numbers ({spec.dtype})")
    if a.ndim != len(axes) or not all(ax.name == "batch" or ax.accepts(n) for n, ax in zip(a.shape, axes, strict=True)):
        raise UserError(f"{key} has shape {tuple(a.shape)}; expected {expected_shape(axes)}")


def _cast(where: str, spec, a: np.ndarray) -> np.ndarray:
    """`a` in the graph's dtype: floats must be finite (in that dtype too), integers fit exactly."""
    key = f"{where}: key '{spec.name}'"
    target = np.dtype(spec.dtype)
    if a.dtype.kind == "f":
        bad = ~np.isfinite(a)
        if bad.any():
            row = int(np.argwhere(bad)[0][0])
            raise UserError(f"{key} (shape {tuple(a.shape)}) holds {int(bad.sum())} NaN/Inf value(s), first in row "
                            f"{row}; calibration needs finite numbers")
    if target.kind in "iu" and a.dtype.kind == "f" and not np.array_equal(a, np.round(a)):
        raise UserError(f"{key} holds fractional values; this input takes integers ({spec.dtype})")
    with np.errstate(over="ignore", invalid="ignore"):
        out = a.astype(target)
    if target.kind == "f" and not np.isfinite(out).all():
        raise UserError(f"{key} holds values beyond the range of {spec.dtype}")
    return np.ascontiguousarray(out)


def _check_shared_axes(where: str, specs: Sequence, arrays: Mapping[str, np.ndarray], axes: Mapping) -> None:
    """A named dynamic axis (the prompt length shared by a text embedding and its mask) has one value."""
    seen: dict[str, tuple[str, int]] = {}
    for spec in specs:
        for n, ax in zip(arrays[spec.name].shape, axes[spec.name], strict=True):
            if not ax.dynamic or ax.name == "batch":
                continue
            if ax.name in seen and seen[ax.name][1] != n:
                other, m = seen[ax.name]
                raise UserError(f"{where}: key '{spec.name}' has shape {tuple(arrays[spec.name].shape)}: its "
                                f"{ax.name} is {n}, but '{other}' has {ax.name} {m}; they must agree")
            seen.setdefault(ax.name, (spec.name, n))
