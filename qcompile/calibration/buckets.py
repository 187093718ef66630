"""Timestep buckets: K contiguous groups of timesteps, each deployed with its own activation scales.

Activation ranges drift with the timestep (the time-embedding path and conv_in most), so one static
scale either clips early steps or wastes resolution on late ones. Buckets are contiguous in t so a
runner picks one by comparing the timestep with K-1 edges. Uniform buckets split the recorded
timesteps evenly; data-driven buckets place the edges where they minimise the mismatch between each
timestep's own range and its bucket's range, summed over tensors (dynamic programming over the sorted
timesteps, exact for this cost).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qcompile.calibration.stats import StatsTable
from qcompile.config import BucketMethod


@dataclass(frozen=True)
class Bucket:
    index: int
    timestep_indices: tuple[int, ...]  # rows of StatsTable.timesteps
    timestep_range: tuple[float, float]  # [lo, hi) in timestep values; the runner's selection rule


def _log_ranges(table: StatsTable) -> np.ndarray:
    """(tensors, T) log of each timestep's absmax range, per tensor (zeros where unseen)."""
    rows = []
    for st in table.tensors.values():
        amax = np.maximum(np.abs(st.lo), np.abs(st.hi))
        amax = np.where(np.isfinite(amax) & (amax > 0), amax, np.nan)
        rows.append(np.log(amax))
    r = np.array(rows) if rows else np.zeros((0, len(table.timesteps)))
    return np.nan_to_num(r - np.nanmean(r, axis=1, keepdims=True) if r.size else r)


def segment_cost(log_r: np.ndarray, i: int, j: int) -> float:
    """Cost of one bucket over sorted timesteps i..j-1: every timestep quantized with the bucket's
    (max) range loses log(r_bucket / r_t) of resolution; squared and summed over tensors."""
    seg = log_r[:, i:j]
    return float(np.sum((seg.max(axis=1, keepdims=True) - seg) ** 2))


def choose_buckets(table: StatsTable, k: int, method: BucketMethod, *, timestep_scale: float) -> list[Bucket]:
    ts = table.timesteps
    if np.isnan(ts).all() or k <= 1 or len(ts) <= 1:
        return [Bucket(0, tuple(range(len(ts))), (0.0, float(timestep_scale)))]
    order = np.argsort(ts)  # ascending timestep
    k = min(k, len(ts))
    if method is BucketMethod.UNIFORM:
        cuts = [round(i * len(ts) / k) for i in range(k + 1)]
    else:
        cuts = _dp_cuts(_log_ranges(table)[:, order], k)
    buckets = []
    for b in range(k):
        idx = order[cuts[b]:cuts[b + 1]]
        lo = 0.0 if b == 0 else float((ts[order[cuts[b] - 1]] + ts[order[cuts[b]]]) / 2)
        hi = float(timestep_scale) if b == k - 1 else float((ts[order[cuts[b + 1] - 1]] + ts[order[cuts[b + 1]]]) / 2)
        buckets.append(Bucket(b, tuple(int(i) for i in idx), (lo, hi)))
    return buckets


def _dp_cuts(log_r: np.ndarray, k: int) -> list[int]:
    n = log_r.shape[1]
    cost = np.full((n + 1, n + 1), np.inf)
    for i in range(n):
        for j in range(i + 1, n + 1):
            cost[i, j] = segment_cost(log_r, i, j)
    best = np.full((k + 1, n + 1), np.inf)
    back = np.zeros((k + 1, n + 1), np.int64)
    best[0, 0] = 0.0
    for b in range(1, k + 1):
        for j in range(b, n + 1):
            cands = best[b - 1, b - 1:j] + cost[b - 1:j, j]
            i = int(np.argmin(cands)) + b - 1
            best[b, j], back[b, j] = cands[i - b + 1], i
    cuts = [n]
    for b in range(k, 0, -1):
        cuts.append(int(back[b, cuts[-1]]))
    return cuts[::-1]
