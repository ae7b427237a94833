"""Small statistics helpers (nearest-rank percentiles) so the analyzer needs no numpy."""
from __future__ import annotations

import math


def percentile(sorted_vals: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list; q in [0, 100]."""
    if not sorted_vals:
        return 0.0
    k = max(0, math.ceil(q / 100.0 * len(sorted_vals)) - 1)
    return float(sorted_vals[min(k, len(sorted_vals) - 1)])


def median(vals) -> float:
    return percentile(sorted(vals), 50)


def summary(vals, scale: float = 1.0) -> dict | None:
    """{p50, p90, p99, mean, count} of `vals` times `scale`; None when there are no values."""
    if not vals:
        return None
    s = sorted(v * scale for v in vals)
    return {"p50": percentile(s, 50), "p90": percentile(s, 90), "p99": percentile(s, 99),
            "mean": sum(s) / len(s), "count": len(s)}


def union_ns(intervals) -> int:
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


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs (0 when the xs do not vary)."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0
