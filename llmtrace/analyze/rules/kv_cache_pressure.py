"""`kv-cache-pressure`: the KV cache limits the batch (or is far larger than needed).

Fingerprints: `preempt` instants (a sequence evicted and later recomputed); decode steps
where `kv_blocks_used / kv_blocks_total` >= FULL while the `waiting` counter is > 0 (the
batch is capped by memory); and the opposite, peak use below OVERSIZED of the budget.
Savings: a preemption costs a recompute, estimated as the median prefill step; a capped
step could have run min(batch + waiting, max_num_seqs) sequences in about the same time
(decode is memory-bound); an oversized budget saves no time (it frees memory).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ... import names
from ..stats import median
from .limits import max_num_seqs

if TYPE_CHECKING:
    from ..analysis import Analysis, Suggestion
    from ..breakdown import StepCost

ID = "kv-cache-pressure"
FULL = 0.95
OVERSIZED = 0.25
MIN_STEPS = 3


def _usage(ctx: Analysis, sc: StepCost) -> float | None:
    used, total = ctx.counter_before(names.C_KV_BLOCKS_USED, sc), ctx.counter_before(names.C_KV_BLOCKS_TOTAL, sc)
    return used / total if used is not None and total else None


def _blocks(ctx: Analysis) -> str:
    return ctx.setting(names.K_KV_BLOCKS, "the number of KV-cache blocks, or the memory share that sizes it")


def _seqs(ctx: Analysis) -> str:
    return ctx.setting(names.K_MAX_NUM_SEQS, "the limit on sequences per step")


def _preemptions(ctx: Analysis) -> Suggestion | None:
    pre = ctx.index.instants.get(names.I_PREEMPT, ())
    if not pre:
        return None
    ref = ctx.breakdown.prefill_steps() or ctx.steps
    recompute_ns = median(sc.wall_ns for sc in ref) if ref else 0
    return ctx.suggestion(
        ID,
        f"{len(pre)} preemptions: KV cache too small for the batch",
        names.SCHEDULE,
        {
            "preemptions": len(pre),
            "requests": sorted({str(i.attrs.get("req")) for i in pre})[:5],
            "recompute_ms_est": round(recompute_ns / 1e6, 4),
        },
        ctx.ms_per_token(len(pre) * recompute_ns),
        f"Give the KV cache more blocks ({_blocks(ctx)}), lower {_seqs(ctx)} so admitted sequences fit, "
        "or shorten the requests' max_tokens; each preemption recomputes the sequence's prefix.",
    )


def _capped(ctx: Analysis) -> Suggestion | None:
    cap = max_num_seqs(ctx)
    steps: list[StepCost] = []
    targets: list[int] = []
    peak = 0.0
    for sc in ctx.breakdown.decode_steps():
        u, waiting = _usage(ctx, sc), ctx.counter_before("waiting", sc)
        if u is not None and u >= FULL and waiting:
            steps.append(sc)
            targets.append(min(sc.tokens + int(waiting), cap or 1 << 30))
            peak = max(peak, u)
    if len(steps) < MIN_STEPS:
        return None
    saving = ctx.saving_if_batched(steps, targets)
    return ctx.suggestion(
        ID,
        f"KV cache full in {len(steps)} decode steps while requests wait",
        "schedule",
        {
            "steps_capped": len(steps),
            "kv_usage_peak": round(peak, 3),
            "batch_p50": median(sc.tokens for sc in steps),
            "batch_possible_p50": median(targets),
            "example_steps": [sc.step for sc in steps[:5]],
        },
        saving,
        f"Give the KV cache more blocks ({_blocks(ctx)}), store it in a smaller dtype (fp8), or use smaller "
        f"blocks ({ctx.setting(names.K_KV_BLOCK_SIZE, 'tokens per KV block')}) to cut fragmentation, so "
        "more sequences decode per step.",
    )


def _oversized(ctx: Analysis) -> Suggestion | None:
    kv = ctx.metrics["kv_usage"]
    if (
        not kv
        or not kv["total_blocks"]
        or kv["peak_fraction"] >= OVERSIZED
        or len(ctx.steps) < 10
        or ctx.index.instants.get(names.I_PREEMPT)
    ):  # no total: the budget is unknown
        return None
    return ctx.suggestion(
        ID,
        f"KV cache peaks at {kv['peak_fraction']:.0%} of its budget",
        "schedule",
        {
            "peak_blocks": kv["peak_blocks"],
            "total_blocks": kv["total_blocks"],
            "kv_usage_peak": round(kv["peak_fraction"], 3),
        },
        0.0,
        f"The KV budget is far above peak use: allocate fewer blocks ({_blocks(ctx)}) to free memory, "
        f"or raise {_seqs(ctx)} if requests queue.",
        f"memory: {kv['total_blocks'] - kv['peak_blocks']:.0f} of {kv['total_blocks']:.0f} KV blocks were never used",
    )


def check(ctx: Analysis) -> list[Suggestion]:
    return [s for s in (_preemptions(ctx), _capped(ctx), _oversized(ctx)) if s is not None]
