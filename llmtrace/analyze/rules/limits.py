"""The scheduler's limits as the trace records them (never read from a config file):
the `max_num_seqs` counter the master records at start, or the attr on `master.step`."""
from __future__ import annotations


def max_num_seqs(ctx) -> int | None:
    v = ctx.index.counter_max("max_num_seqs")
    if v is None:
        vals = [v for sc in ctx.steps if isinstance(v := sc.root.attrs.get("max_num_seqs"), (int, float))]
        v = max(vals) if vals else None
    return int(v) if v else None
