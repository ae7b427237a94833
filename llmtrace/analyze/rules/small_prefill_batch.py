"""`small-prefill-batch`: prefill steps that admit one request while others wait.

Fingerprint: `master.step` with prefill=1 and batch=1 while the `waiting` counter before
that step (the admitted request included) is above 1.
Saving: those prefills batched g at a time (g = the mean number available, capped by
`max_num_seqs`) need ceil(n/g) steps instead of n; each step avoided saves its fixed
cost, the step's non-model time (the model time grows with the prompt tokens and stays).
Impact, small as that saving may be: the waiting requests' time to first token, each
queued behind the one-request prefills ahead of it, (g - 1) / 2 of them on average.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from ... import names
from ..breakdown import MODEL
from ..stats import median
from .limits import max_num_seqs

if TYPE_CHECKING:
    from ..analysis import Analysis, Suggestion

ID = "small-prefill-batch"


def check(ctx: Analysis) -> list[Suggestion]:
    singles, avail = [], []
    for sc in ctx.breakdown.prefill_steps():
        waiting = ctx.counter_before("waiting", sc)
        if sc.tokens == 1 and waiting is not None and waiting > 1:
            singles.append(sc)
            avail.append(waiting)
    if len(singles) < 2:
        return []
    g = sum(avail) / len(avail)
    cap = max_num_seqs(ctx)
    if cap:
        g = min(g, cap)
    avoided = len(singles) - math.ceil(len(singles) / g)
    fixed_ns = median(sc.wall_ns - sc.parts.get(MODEL, 0) for sc in singles)
    saving = ctx.ms_per_token(avoided * fixed_ns)
    queued_ms = (g - 1) / 2 * median(sc.wall_ns for sc in singles) / 1e6
    return [
        ctx.suggestion(
            ID,
            f"{len(singles)} prefill steps ran one request while {g - 1:.0f} more waited",
            "schedule",
            {
                "single_prefill_steps": len(singles),
                "waiting_mean": round(sum(avail) / len(avail), 2),
                "batch_possible": round(g, 2),
                "steps_avoidable": avoided,
                "fixed_ms_per_step": round(fixed_ns / 1e6, 4),
                "example_steps": [sc.step for sc in singles[:5]],
            },
            saving,
            "Admit every waiting request that fits the token budget into one prefill step (raise "
            f"{ctx.setting(names.K_MAX_BATCHED_TOKENS, 'the tokens-per-step budget')} / "
            f"{ctx.setting(names.K_MAX_NUM_SEQS, 'the sequences-per-step limit')}, or split long prompts into "
            "chunks) instead of one request per step.",
            impact=f"time to first token: a waiting request queues ~{queued_ms:.1f} ms behind one-request prefills",
        )
    ]
