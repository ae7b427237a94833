"""The scheduler's limits as the trace records them (never read from a config file): the
process resource `max_num_seqs` (`llmtrace.configure(resource=...)`), else the attr on
the step roots."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ... import names

if TYPE_CHECKING:
    from ..analysis import Analysis


def max_num_seqs(ctx: Analysis) -> int | None:
    vals = [
        v for p in ctx.trace.processes.values() if isinstance(v := p.resource.get(names.R_MAX_NUM_SEQS), (int, float))
    ]
    if not vals:
        vals = [v for sc in ctx.steps if isinstance(v := sc.root.attrs.get(names.R_MAX_NUM_SEQS), (int, float))]
    return int(max(vals)) if vals else None
