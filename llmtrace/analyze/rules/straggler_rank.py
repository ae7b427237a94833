"""`straggler-rank`: one rank of a tensor-parallel group is slower than the others, and the
others wait for it inside every collective.

Fingerprint: `allreduce` spans (engine/models/tensor_parallel.py, or any pipeline's spans of
that stage) in several processes, per step: a collective ends when its slowest rank
arrives, so the rank that spends the least time in them is the one the others wait for.
When the same rank is that one in most steps (MIN_SHARE), it is the straggler.
Saving: per step, what the next-fastest rank spends in collectives beyond the straggler:
the time the group waits for it, which a balanced group (the straggler's device, CPU
placement or share of the work fixed) would not spend. Evidence: the collectives' share
of the slowest rank's steps.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import TYPE_CHECKING

from ... import names
from ..stats import median

if TYPE_CHECKING:
    from ..analysis import Analysis, Suggestion

ID = "straggler-rank"
MIN_SHARE = 0.6  # of the steps with collectives on several ranks
FIX = (
    "Find what slows this rank: another process or the host's other work on its GPU or CPU cores "
    "(pin each rank to its own cores and NUMA node), a slower or throttled device, or more work "
    "assigned to it; the other ranks wait for it in every collective."
)


def _collective_ns(ctx: Analysis) -> dict[int, dict[int, int]]:
    """step -> {pid: time in collectives (device time where recorded)}."""
    out: dict[int, dict[int, int]] = defaultdict(lambda: defaultdict(int))
    for s in ctx.index.by_stage.get(names.ALLREDUCE, ()):
        if s.step >= 0:
            out[s.step][s.pid] += s.device_dur_ns if s.device_dur_ns is not None else s.dur_ns
    return {k: v for k, v in out.items() if len(v) > 1}


def check(ctx: Analysis) -> list[Suggestion]:
    per_step = _collective_ns(ctx)
    if len(per_step) < 3:
        return []
    fastest: Counter[int] = Counter()
    waits: dict[int, int] = {}
    for step, ranks in per_step.items():
        ordered = sorted(ranks.items(), key=lambda kv: kv[1])
        fastest[ordered[0][0]] += 1
        waits[step] = ordered[1][1] - ordered[0][1]
    pid, n = fastest.most_common(1)[0]
    if n < MIN_SHARE * len(per_step) or median(waits.values()) <= 0:  # ties: nobody waits
        return []
    name = ctx.trace.processes[pid].name if pid in ctx.trace.processes else str(pid)
    saving = ctx.ms_per_token(sum(waits.values()))
    slowest = [max(r.values()) for r in per_step.values()]
    walls = {sc.step: sc.wall_ns for sc in ctx.steps}
    share = [c / walls[k] for k, c in zip(per_step, slowest) if walls.get(k)]
    return [
        ctx.suggestion(
            ID,
            f"{name} is the straggler: the other ranks wait for it in {n} of {len(per_step)} steps' collectives",
            names.ALLREDUCE,
            {
                "rank_process": name,
                "steps_waited_for": n,
                "steps_with_collectives": len(per_step),
                "wait_ms_per_step_p50": round(median(waits.values()) / 1e6, 4),
                "collective_share_of_step_p50": round(median(share), 4) if share else None,
            },
            saving,
            FIX,
            per_step=waits,
        )
    ]
