"""Estimators: a group of timesteps' statistics -> the range an activation is clipped to.

All work from the cached statistics alone (no model run), so switching estimator or bucket count
costs milliseconds. MAX takes the extremes; PERCENTILE clips each side at a quantile of the
magnitude histogram; MSE picks the clipping that minimises expected quantization error (rounding
noise inside the range, clipping error outside) for the target's number of levels; ENTROPY is the
KL-divergence calibration TensorRT popularised, on the magnitude distribution.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from qcompile.calibration.stats import StatsTable, TensorStats, bin_edges
from qcompile.config import Estimator
from qcompile.quant import TensorRange

PERCENTILE = 99.99
KL_BINS, KL_LEVELS = 2048, 128


def _edges() -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper magnitude of every histogram bin (bin 0 is [0, 2**LOG2_MIN))."""
    upper = bin_edges()
    lower = np.concatenate([[0.0], upper[:-1]])
    return lower, upper


def _centers() -> np.ndarray:
    lower, upper = _edges()
    return np.where(lower > 0, np.sqrt(lower * np.maximum(upper, lower)), upper / 2)


def _side_percentile(hist: np.ndarray, total: int, q: float) -> float:
    """Magnitude below which all but (1 - q) of `total` elements lie, on one side's histogram."""
    outside = total * (1.0 - q / 100.0)
    tail = np.cumsum(hist[::-1])[::-1]  # elements at or above each bin
    above = np.nonzero(tail > outside)[0]
    if not len(above):
        return 0.0
    return float(_edges()[1][above[-1]])


def _mse_range(hist: np.ndarray, lo: float, hi: float, levels: int, symmetric: bool) -> tuple[float, float]:
    """Clipping (a, b) minimising expected squared error: rounding noise step^2/12 inside the range,
    squared clipping distance outside. Each side is searched independently (activations after
    SiLU or GELU are far from symmetric); symmetric targets search one magnitude."""
    centers = _centers()
    values = np.concatenate([-centers, centers])
    counts = np.concatenate([hist[0], hist[1]]).astype(np.float64)
    alphas = np.linspace(0.02, 1.0, 50)
    if symmetric:
        amax = max(abs(lo), abs(hi))
        a = -alphas[:, None] * amax
        b = alphas[:, None] * amax
    else:
        a = (alphas[:, None] * lo)[:, None, :]  # (A, 1, 1)
        b = (alphas[:, None] * hi)[None, :, :]  # (1, A, 1)
    step = np.maximum(b - a, 1e-12) / levels
    clipped = np.clip(values, a, b)
    err = np.sum(counts * ((values - clipped) ** 2 + (values == clipped) * step**2 / 12.0), axis=-1)
    best = np.unravel_index(int(np.argmin(err)), err.shape)
    if symmetric:
        return float(a[best[0], 0]), float(b[best[0], 0])
    return float(alphas[best[0]] * lo), float(alphas[best[1]] * hi)


def _kl_threshold(hist: np.ndarray, amax: float) -> float:
    """TensorRT-style entropy calibration on a uniform re-binning of the magnitude histogram."""
    if amax <= 0:
        return 0.0
    mag = hist.sum(axis=0).astype(np.float64)
    width = amax / KL_BINS
    uniform = np.zeros(KL_BINS)
    np.add.at(uniform, np.minimum((_centers() / width).astype(np.int64), KL_BINS - 1), mag)
    best_i, best_kl = KL_BINS, np.inf
    for i in range(KL_LEVELS, KL_BINS + 1, 16):
        p = uniform[:i].copy()
        p[-1] += uniform[i:].sum()
        chunks = np.array_split(uniform[:i], KL_LEVELS)
        q = np.concatenate([np.where(c > 0, c.sum() / max((c > 0).sum(), 1), 0.0) for c in chunks])
        ps, qs = p / max(p.sum(), 1e-30), q / max(q.sum(), 1e-30)
        mask = ps > 0
        kl = np.sum(ps[mask] * np.log(ps[mask] / np.maximum(qs[mask], 1e-12)))
        if kl < best_kl:
            best_i, best_kl = i, kl
    return min(amax, (best_i + 0.5) * width)


def estimate_range(st: TensorStats, idx: np.ndarray, estimator: Estimator, *, levels: int = 255,
                   symmetric: bool = False) -> TensorRange:
    lo, hi = float(np.min(st.lo[idx])), float(np.max(st.hi[idx]))
    if estimator is Estimator.MAX:
        return TensorRange(lo, hi)
    hist = st.hist[idx].sum(axis=0)
    if estimator is Estimator.PERCENTILE:
        total = int(st.count[idx].sum())
        return TensorRange(max(lo, -_side_percentile(hist[0], total, PERCENTILE)),
                           min(hi, _side_percentile(hist[1], total, PERCENTILE)))
    if estimator is Estimator.MSE:
        return TensorRange(*_mse_range(hist, min(lo, 0.0), max(hi, 0.0), levels, symmetric))
    thr = _kl_threshold(hist, max(abs(lo), abs(hi)))
    return TensorRange(max(lo, -thr), min(hi, thr))


def estimate_ranges(table: StatsTable, estimator: Estimator, timestep_indices: Sequence[int] | None = None, *,
                    names: Sequence[str] | None = None, levels: int = 255,
                    symmetric: bool = False) -> dict[str, TensorRange]:
    """Ranges for `names` (all tensors) over the given timesteps (all of them)."""
    idx = np.arange(len(table.timesteps)) if timestep_indices is None else np.asarray(timestep_indices)
    out = {}
    for name in names if names is not None else table.tensors:
        st = table.tensors.get(name)
        if st is None or not np.any(st.count[idx]):
            continue
        out[name] = estimate_range(st, idx, estimator, levels=levels, symmetric=symmetric)
    return out


def channel_absmax(table: StatsTable, name: str, timestep_indices: Sequence[int] | None = None) -> np.ndarray:
    """Per-channel absmax of one tensor over the given timesteps (per-channel MAX estimator)."""
    st = table.tensors[name]
    idx = np.arange(len(table.timesteps)) if timestep_indices is None else np.asarray(timestep_indices)
    return st.chan_absmax[idx].max(axis=0)

