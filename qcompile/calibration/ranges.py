"""Estimators: statistics of a group of calibration samples -> the range each activation is clipped to."""

from __future__ import annotations

import numpy as np

from qcompile.calibration.observe import MinMaxStats
from qcompile.config import Estimator
from qcompile.quant import TensorRange


def estimate_ranges(stats: MinMaxStats, estimator: Estimator, samples: np.ndarray | None = None
                    ) -> dict[str, TensorRange]:
    """Ranges over `samples` (indices; all samples when None). MAX takes the extremes."""
    if estimator is not Estimator.MAX:
        raise NotImplementedError(f"estimator {estimator.value}")
    out = {}
    for name, lo in stats.lo.items():
        hi = stats.hi[name]
        sel_lo = lo if samples is None else lo[samples]
        sel_hi = hi if samples is None else hi[samples]
        if not np.isfinite(sel_lo).any():
            continue
        out[name] = TensorRange(float(np.nanmin(sel_lo)), float(np.nanmax(sel_hi)))
    return out
