"""`gil-contention`: the step loop's thread waited for the GIL while other Python threads of
its process ran.

Fingerprint: over each step (the step thread's own part of it: a thread-pool step ends, for
its thread, where the thread of the next forward takes over), the step thread's time
neither on a CPU nor runnable (Linux schedstat), not inside a recorded wait of its own (a
receive or poll, a sleep, a device sync) and not where its stack samples show it blocked in
a wait (a pool's worker back at its work queue) is blocked on something unrecorded; where
other Python threads of the same process ran (or were runnable: a thread may hold the GIL
while it waits for a CPU) in that window, no longer than their stack samples show them
working there (when the process was sampled), the smaller of the two is counted as GIL wait. Only Python
threads count (torch's native intra-op threads do not hold the GIL). At least MIN_SHARE
of the steps' wall time, summed.
Saving: that time per token.
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING

from ... import names
from ...names import is_receive
from ..stats import union_ns

if TYPE_CHECKING:
    from ..analysis import Analysis, Suggestion
    from ..breakdown import StepCost

ID = "gil-contention"
MIN_SHARE = 0.05
_WAIT_STAGES = (names.SLEEP, names.SYNC)


def _own_waits_ns(sc: StepCost, end: int) -> int:
    r = sc.root
    spans = [
        s for _, s in sc.stage_spans if s.pid == r.pid and s.tid == r.tid and (is_receive(s) or s.stage in _WAIT_STAGES)
    ]
    return union_ns((max(s.start_ns, r.start_ns), min(s.end_ns, end)) for s in spans if s.start_ns < end)


def check(ctx: Analysis) -> list[Suggestion]:
    cpu = ctx.cpu
    if not cpu or not ctx.steps:
        return []
    wall, gil_ns = 0.0, 0.0
    by_thread: dict[tuple[int, int], float] = defaultdict(float)
    fn, sampled = ctx.functions, ctx.functions.samples_pids()
    for sc in ctx.steps:
        r = sc.root
        lo, hi = sc.own_ns  # a pool thread that handed the step on waits for work, not the GIL
        d = cpu.delta(r.pid, r.tid, lo, hi)
        if d is None:
            continue
        wall += hi - lo
        unexplained = hi - lo - d[0] - d[1] - _own_waits_ns(sc, hi) - fn.sampled_ns(r.pid, r.tid, lo, hi, idle=True)
        # CPU time is read 20 times a second and spread evenly over each interval, so two
        # pool threads taking turns at steps look busy at once: where stack samples say
        # when the others worked, that bounds their time
        others = {
            tid: min(ns, fn.sampled_ns(r.pid, tid, lo, hi, idle=False)) if r.pid in sampled else ns
            for tid, ns in cpu.others_busy(r.pid, r.tid, lo, hi).items()
        }
        others = {tid: ns for tid, ns in others.items() if ns > 0}
        if unexplained <= 0 or not others:
            continue
        gil_ns += min(unexplained, sum(others.values()))
        for tid, ns in others.items():
            by_thread[(r.pid, tid)] += ns
    if not wall or gil_ns / wall < MIN_SHARE:
        return []
    top = sorted(by_thread.items(), key=lambda kv: -kv[1])[:3]
    threads = [
        {
            "thread": ctx.trace.processes[pid].threads.get(tid, str(tid)),
            "pid": pid,
            "tid": tid,
            "busy_ms_in_steps": round(ns / 1e6, 3),
        }
        for (pid, tid), ns in top
    ]
    ev = {
        "gil_wait_share_of_steps": round(gil_ns / wall, 3),
        "gil_wait_ms_per_step": round(gil_ns / len(ctx.steps) / 1e6, 4),
        "threads": threads,
    }
    busiest = f" while {threads[0]['thread']} ran" if threads else ""
    return [
        ctx.suggestion(
            ID,
            f"The step loop waited for the GIL {gil_ns / wall:.0%} of its time{busiest}",
            names.GIL,
            ev,
            ctx.ms_per_token(gil_ns),
            "Python threads of one process take turns on the GIL: move the other threads' Python work "
            "(request parsing, detokenizing, metrics, logging) to another process or onto the step loop's idle "
            "time, make it release the GIL (numpy, I/O), or batch it so it runs less often.",
        )
    ]
