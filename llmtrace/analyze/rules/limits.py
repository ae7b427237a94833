"""The scheduler's limits as the trace records them (never read from a config file): the
process resource `max_num_seqs` (`llmtrace.configure(resource=...)`), else the attr on
the step roots."""
from __future__ import annotations

from ... import names


def max_num_seqs(ctx) -> int | None:
    vals = [p.resource.get(names.R_MAX_NUM_SEQS) for p in ctx.trace.processes.values()]
    vals = [v for v in vals if isinstance(v, (int, float))]
    if not vals:
        vals = [v for sc in ctx.steps if isinstance(v := sc.root.attrs.get(names.R_MAX_NUM_SEQS), (int, float))]
    return int(max(vals)) if vals else None
