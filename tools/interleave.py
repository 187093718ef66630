"""Latency of several programs measured side by side, for every benchmark in tools/.

On a shared machine another process's load comes and goes; timing all runs of one side, then all
runs of the other, lets that load land on one side only. Here every round runs each program once,
the order reversed every other round (so no side always runs right after a cold cache or always
last), and each side's runs are kept: the table reports the median and the spread (interquartile
range), and a speed-up is the median of the per-round ratios, paired run for run.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Timing:
    """One program's wall times in milliseconds, one per round."""

    runs_ms: tuple[float, ...]

    @property
    def median_ms(self) -> float:
        return float(np.median(self.runs_ms))

    @property
    def iqr_ms(self) -> tuple[float, float]:
        q1, q3 = np.percentile(self.runs_ms, [25, 75])
        return float(q1), float(q3)

    def describe(self) -> str:
        """`13.40 ms (13.10-13.90)`: median and interquartile range."""
        q1, q3 = self.iqr_ms
        return f"{self.median_ms:.2f} ms ({q1:.2f}-{q3:.2f})"

    def as_dict(self) -> dict[str, float | int]:
        q1, q3 = self.iqr_ms
        return {"median_ms": round(self.median_ms, 3), "q1_ms": round(q1, 3), "q3_ms": round(q3, 3),
                "min_ms": round(min(self.runs_ms), 3), "max_ms": round(max(self.runs_ms), 3), "runs": len(self.runs_ms)}


@dataclass(frozen=True)
class Speedup:
    """base / other per round: the median, and the interquartile range of the paired ratios."""

    median: float
    q1: float
    q3: float

    def describe(self) -> str:
        return f"{self.median:.2f}x ({self.q1:.2f}-{self.q3:.2f})"

    def as_dict(self) -> dict[str, float]:
        return {"speedup": round(self.median, 3), "speedup_q1": round(self.q1, 3), "speedup_q3": round(self.q3, 3)}


def interleaved(calls: Mapping[str, Callable[[], object]], *, runs: int, warmup: int = 3) -> dict[str, Timing]:
    """Run every call `warmup` times, then `runs` rounds of one call each, alternating the order."""
    if runs < 1:
        raise ValueError("runs must be at least 1")
    labels = list(calls)
    for _ in range(warmup):
        for label in labels:
            calls[label]()
    times: dict[str, list[float]] = {label: [] for label in labels}
    for i in range(runs):
        for label in labels if i % 2 == 0 else labels[::-1]:
            t0 = time.perf_counter()
            calls[label]()
            times[label].append((time.perf_counter() - t0) * 1e3)
    return {label: Timing(tuple(ts)) for label, ts in times.items()}


def speedup(base: Timing, other: Timing) -> Speedup:
    """How many times faster `other` is than `base`, round by round (both from one `interleaved` call)."""
    ratios = np.asarray(base.runs_ms) / np.asarray(other.runs_ms)
    q1, q3 = np.percentile(ratios, [25, 75])
    return Speedup(float(np.median(ratios)), float(q1), float(q3))
