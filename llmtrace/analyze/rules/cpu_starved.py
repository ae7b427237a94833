"""`cpu-starved`: the steps were slow because their threads waited for a CPU.

Fingerprint: in the step windows (the step loop's thread over each step, and the peer
threads whose work stood for a blocking receive), the time those threads spent runnable
on a run queue (Linux schedstat, llmtrace/cpu_time.py) is at least MIN_SHARE of the
steps' wall time: other processes, or more busy threads than usable CPUs (torch's
intra-op threads in every process, say), took the CPUs.
Saving: that run-queue time per token (what a CPU of its own would give back); the
model's time on a starved machine is inflated too, which the estimate leaves out.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ... import names

if TYPE_CHECKING:
    from ..analysis import Analysis, Suggestion
    from ..breakdown import StepCost
    from ..cpu import ThreadCpu

ID = "cpu-starved"
MIN_SHARE = 0.10


def _windows(sc: StepCost) -> list[tuple[int, int, int, int]]:
    r = sc.root
    return [(r.pid, r.tid, r.start_ns, r.end_ns)] + [(p, t, lo, hi) for p, t, lo, hi, _ in sc.peer_windows]


def _demand_cores(cpu: ThreadCpu, lo: int, hi: int) -> float:
    """CPU time used plus wanted by every recorded thread over [lo, hi), in cores."""
    total = sum(sum(d) for (pid, tid) in cpu.series if (d := cpu.delta(pid, tid, lo, hi)) is not None)
    return total / (hi - lo) if hi > lo else 0.0


def check(ctx: Analysis) -> list[Suggestion]:
    cpu = ctx.cpu
    if not cpu or not ctx.steps:
        return []
    wall = runq = 0.0
    for sc in ctx.steps:
        deltas = [cpu.delta(*w) for w in _windows(sc)]
        if deltas[0] is None:
            continue
        wall += sc.wall_ns
        runq += sum(d[1] for d in deltas if d is not None)
    if not wall or runq / wall < MIN_SHARE:
        return []
    lo, hi = ctx.steps[0].root.start_ns, ctx.steps[-1].root.end_ns
    usable = cpu.machine.get("cpus_usable")
    demand = _demand_cores(cpu, lo, hi)
    ev = {
        "runqueue_share_of_steps": round(runq / wall, 3),
        "runqueue_ms_per_step": round(runq / len(ctx.steps) / 1e6, 4),
        "cpus_usable": usable,
        "cpu_demand_cores": round(demand, 2),
        "load1": cpu.load1(),
        "threads_recorded": len(cpu.series),
    }
    ms = ctx.ms_per_token(runq)
    where = f" (load {ev['load1']} on {usable} CPUs)" if usable and ev["load1"] is not None else ""
    return [
        ctx.suggestion(
            ID,
            f"Steps waited for a CPU {runq / wall:.0%} of their time{where}: the machine, not the model, is slow",
            names.CPU,
            ev,
            ms,
            "Give the serving processes CPUs of their own: fewer busy processes and threads than usable CPUs "
            "(torch.set_num_threads / OMP_NUM_THREADS in each process, one intra-op pool per core), move other "
            "jobs off this machine or pin them elsewhere (taskset, cgroups cpusets). Timings taken while starved "
            "overstate every stage, the model included.",
        )
    ]
