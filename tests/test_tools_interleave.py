"""tools/interleave.py: both sides of a benchmark run in one loop, order alternating, and a speed-up is
the median of per-round ratios (no wall-clock assertion: the timings here are given, not measured)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

from interleave import Timing, interleaved, speedup  # noqa: E402


def test_rounds_alternate_the_order_and_keep_every_run():
    calls = []
    timings = interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, runs=4, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b", "b", "a"]  # warm-up, then a b / b a / a b / b a
    assert [len(t.runs_ms) for t in timings.values()] == [4, 4]


def test_speedup_pairs_rounds():
    base = Timing((10.0, 20.0, 10.0, 40.0))
    fast = Timing((5.0, 10.0, 10.0, 10.0))  # ratios 2, 2, 1, 4
    s = speedup(base, fast)
    assert s.median == pytest.approx(2.0) and s.q1 == pytest.approx(1.75) and s.q3 == pytest.approx(2.5)
    assert base.median_ms == pytest.approx(15.0) and base.iqr_ms == pytest.approx((10.0, 25.0))
    assert Timing((1.0, 2.0, 3.0)).describe() == "2.00 ms (1.50-2.50)"
