"""`underfilled-batch`: decode batches well below the scheduler's maximum while requests
wait and the KV cache has room (when it has none, `kv-cache-pressure` reports it).

Fingerprint: decode `master.step` with batch < FILL x max_num_seqs (the `max_num_seqs`
counter or step attr: the maximum comes from the trace) while `waiting` > 0 and KV use
< KV_ROOM.
Saving: each such step could have run min(batch + waiting, max_num_seqs) sequences in
about the same wall time (decode is memory-bound).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ... import names
from ..stats import median
from .limits import max_num_seqs

if TYPE_CHECKING:
    from ..analysis import Analysis, Suggestion

ID = "underfilled-batch"
FILL = 0.75
KV_ROOM = 0.9
MIN_STEPS = 3


def check(ctx: Analysis) -> list[Suggestion]:
    cap = max_num_seqs(ctx)
    if not cap:
        return []
    steps, targets = [], []
    for sc in ctx.breakdown.decode_steps():
        waiting = ctx.counter_before("waiting", sc)
        used, total = ctx.counter_before("kv_blocks_used", sc), ctx.counter_before("kv_blocks_total", sc)
        kv_full = used is not None and total and used / total >= KV_ROOM
        if waiting and sc.tokens < FILL * cap and not kv_full:
            steps.append(sc)
            targets.append(min(sc.tokens + int(waiting), cap))
    if len(steps) < MIN_STEPS:
        return []
    return [
        ctx.suggestion(
            ID,
            f"Decode batch {median(sc.tokens for sc in steps):.0f} of max {cap} while requests wait "
            f"({len(steps)} steps)",
            "schedule",
            {
                "steps_underfilled": len(steps),
                "max_num_seqs": cap,
                "batch_p50": median(sc.tokens for sc in steps),
                "batch_possible_p50": median(targets),
                "example_steps": [sc.step for sc in steps[:5]],
            },
            ctx.saving_if_batched(steps, targets),
            "Let the scheduler admit waiting requests into running decode batches (continuous batching: "
            "schedule new prefills alongside decodes or as soon as a slot frees) up to "
            f"{ctx.setting(names.K_MAX_NUM_SEQS, 'the sequences-per-step limit')}.",
        )
    ]
