"""`gc-pauses`: Python garbage collection stopping the step loop.

Fingerprints: spans named `gc` / `gc.*` or of stage `gc` (the engine records one per
collection through `gc.callbacks`, attr `generation`), or function events such as
`gc.collect`, on the steps' critical path; `gc` instants count as evidence. Without gc
spans, steps whose unaccounted gap spikes (> SPIKE x its median and > 1 ms) are reported
as unexplained pauses, GC being the usual cause.
Collections in fewer than MIN_STEPS_AFFECTED steps are no pattern (a tuned engine run has
one or two) and no finding.
Saving: the gc (or spike) time per token; freezing the long-lived heap after warm-up
removes most of it. Evidence `responsible`: the program's code the collections interrupted
(stack samples inside gc spans), where the garbage is made; allocating less there saves
its own time too, which the estimate leaves out.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from ... import names
from ..analysis import MIN_STEPS_AFFECTED
from ..breakdown import GAP
from ..functions import covered
from ..stats import median

if TYPE_CHECKING:
    from ..analysis import Analysis, Suggestion
    from ..functions import Call

ID = "gc-pauses"
PATTERN = re.compile(r"^gc(\.|$)")
SPIKE = 5.0
MIN_SPIKES = 2
FIX = (
    "Call gc.freeze() after model load and warm-up (moves long-lived objects out of the collected "
    "generations), raise gc.set_threshold() for generation 0, and avoid per-step allocation of many "
    "small Python objects (lists of ints, dicts per token)."
)


def _gc_time(ctx: Analysis) -> tuple[int, set[int], list[Call]]:
    calls = ctx.functions.select(PATTERN, host_side=True)
    nested_ns, per_step = covered(calls)
    direct = {sc.step: sc.parts.get(names.GC, 0) for sc in ctx.steps if sc.parts.get(names.GC)}
    steps = set(per_step) | set(direct)
    return nested_ns + sum(direct.values()), steps, calls


def _unexplained(ctx: Analysis) -> Suggestion | None:
    gaps = [sc.parts.get(GAP, 0) for sc in ctx.steps]
    if not gaps:
        return None
    m = median(gaps)
    spikes = [(sc.step, g - m) for sc, g in zip(ctx.steps, gaps) if g > max(SPIKE * m, m + 1_000_000)]
    if len(spikes) < MIN_SPIKES:
        return None
    excess = sum(e for _, e in spikes)
    return ctx.suggestion(
        ID,
        f"{len(spikes)} unexplained pauses inside steps (no span covers them; often GC)",
        GAP,
        {
            "pauses": len(spikes),
            "pause_ms_p50": round(median(e for _, e in spikes) / 1e6, 3),
            "gap_ms_p50": round(m / 1e6, 4),
            "example_steps": [s for s, _ in spikes][:5],
        },
        ctx.ms_per_token(excess),
        "Find what runs there: record gc with gc.callbacks (llmtrace's engine does), or run "
        "`llmtrace record --py-spy`. If it is GC: " + FIX,
    )


def check(ctx: Analysis) -> list[Suggestion]:
    ns, steps, calls = _gc_time(ctx)
    if not ns:
        found = _unexplained(ctx)
        return [found] if found else []
    ctx.claim(c.name for c in calls)
    if len(steps) < MIN_STEPS_AFFECTED:  # a collection or two in a whole run: the run's, not a pattern
        return []
    instants = ctx.index.instants.get(names.GC, ())
    collections = sum(1 for c in calls if c.source == "span") + sum(sc.counts.get(names.GC, 0) for sc in ctx.steps)
    # the program's code a collection interrupted (samples taken inside gc spans): where the
    # garbage is made; its own allocating time is not in the saving, only named
    allocators = ctx.functions.responsible(calls)[:3]
    where = f"; collections start in {allocators[0][0]}" if allocators else ""
    return [
        ctx.suggestion(
            ID,
            f"GC pauses cost {ctx.ms_per_token(ns):.2f} ms/token ({collections} collections in steps{where})",
            names.GC,
            {
                "collections_in_steps": collections,
                "gc_ms_per_collection": round(ns / max(1, collections) / 1e6, 4),
                "gc_instants": len(instants),
                "steps_affected": len(steps),
                "example_steps": sorted(steps)[:5],
                "responsible": [{"function": f, "ms_per_token": round(ctx.ms_per_token(t), 4)} for f, t in allocators],
            },
            ctx.ms_per_token(ns),
            FIX,
        )
    ]
