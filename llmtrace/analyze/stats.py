"""Small statistics helpers (nearest-rank percentiles) so the analyzer needs no numpy."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from .report_schema import Percentiles


def percentile(sorted_vals: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list; q in [0, 100]."""
    if not sorted_vals:
        return 0.0
    k = max(0, math.ceil(q / 100.0 * len(sorted_vals)) - 1)
    return float(sorted_vals[min(k, len(sorted_vals) - 1)])


def median(vals: Iterable[float]) -> float:
    return percentile(sorted(vals), 50)


def summary(vals: Sequence[float], scale: float = 1.0) -> Percentiles | None:
    """{p50, p90, p99, mean, count} of `vals` times `scale`; None when there are no values."""
    if not vals:
        return None
    s = sorted(v * scale for v in vals)
    return {
        "p50": percentile(s, 50),
        "p90": percentile(s, 90),
        "p99": percentile(s, 99),
        "mean": sum(s) / len(s),
        "count": len(s),
    }


def union_ns(intervals: Iterable[tuple[int, int]]) -> int:
    """Length of the union of [start, end) intervals (overlaps counted once)."""
    total, end = 0, None
    for lo, hi in sorted(intervals):
        if end is None or lo >= end:
            total += max(0, hi - lo)
            end = hi
        elif hi > end:
            total += hi - end
            end = hi
    return total


INTERVAL_RESAMPLES, INTERVAL_SEED, INTERVAL_MIN_STEPS = 200, 20261207, 10


def per_token_interval(ns: list[float], tokens: list[float]) -> tuple[float, float] | None:
    """95% bootstrap interval over steps (resampled with replacement, fixed seed) of
    sum(ns) / sum(tokens) in ms; None for fewer than INTERVAL_MIN_STEPS steps."""
    if len(ns) < INTERVAL_MIN_STEPS:
        return None
    import numpy as np  # here only: the analyzer imports no numpy otherwise

    rng = np.random.default_rng(INTERVAL_SEED)
    idx = rng.integers(0, len(ns), (INTERVAL_RESAMPLES, len(ns)))
    num = np.asarray(ns, dtype=np.float64)[idx].sum(axis=1)
    den = np.maximum(np.asarray(tokens, dtype=np.float64)[idx].sum(axis=1), 1.0)
    lo, hi = np.percentile(num / den / 1e6, [2.5, 97.5])
    return float(lo), float(hi)


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs (0 when the xs do not vary)."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0
