"""Per-thread CPU time over any window, from the counters the spool recorded
(llmtrace/cpu_time.py): how long a thread ran on a CPU and how long it waited runnable on
a run queue, interpolated linearly between the readings (20 a second), so sums over many
steps are right even where one step is shorter than the reading interval."""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any

from ..timeline import Trace
from .stats import median

OWN_THREADS = ("llmtrace-flush", "llmtrace-sampler")


@dataclass
class _Series:
    ts: list[int]
    run: list[int]
    runq: list[int]

    def at(self, t: int) -> tuple[float, float]:
        i = bisect.bisect_right(self.ts, t)
        if i == 0:
            return float(self.run[0]), float(self.runq[0])
        if i == len(self.ts):
            return float(self.run[-1]), float(self.runq[-1])
        t0, t1 = self.ts[i - 1], self.ts[i]
        f = (t - t0) / (t1 - t0) if t1 > t0 else 0.0
        return (
            self.run[i - 1] + f * (self.run[i] - self.run[i - 1]),
            self.runq[i - 1] + f * (self.runq[i] - self.runq[i - 1]),
        )


class ThreadCpu:
    def __init__(self, trace: Trace):
        self.series: dict[tuple[int, int], _Series] = {}
        self.python_threads: dict[int, set[int]] = {}  # pid -> its Python threads (named ones), llmtrace's left out
        self.loads: list[float] = []
        self.machine: dict[str, Any] = {}
        for pid, p in trace.processes.items():
            self.machine = self.machine or p.header.get("machine") or {}
            self.python_threads[pid] = {tid for tid, name in p.threads.items() if name not in OWN_THREADS}
            for snap in p.cpu:
                self.loads.append(snap.get("load1", 0.0))
                for tid, (run, runq) in snap["threads"].items():
                    s = self.series.setdefault((pid, int(tid)), _Series([], [], []))
                    s.ts.append(snap["ns"])
                    s.run.append(run)
                    s.runq.append(runq)
        self.series = {k: s for k, s in self.series.items() if len(s.ts) >= 2}

    def __bool__(self) -> bool:
        return bool(self.series)

    def delta(self, pid: int, tid: int, lo: int, hi: int) -> tuple[float, float] | None:
        """(ns on a CPU, ns waiting for one) of thread (pid, tid) in [lo, hi), None if unrecorded."""
        s = self.series.get((pid, tid))
        if s is None or hi <= s.ts[0] or lo >= s.ts[-1]:
            return None
        (r0, q0), (r1, q1) = s.at(lo), s.at(hi)
        return r1 - r0, q1 - q0

    def others_busy(self, pid: int, tid: int, lo: int, hi: int) -> dict[int, float]:
        """{tid: ns on a CPU or runnable in [lo, hi)} of the process's other Python threads
        (a runnable thread may hold the GIL while it waits for a CPU)."""
        out = {}
        for other in self.python_threads.get(pid, ()):
            if other != tid and (d := self.delta(pid, other, lo, hi)) is not None and d[0] + d[1] > 0:
                out[other] = d[0] + d[1]
        return out

    def own_share(self, trace: Trace) -> tuple[float, float]:
        """(CPU ns of llmtrace's own threads, CPU ns of every thread), over the recording of
        every process: what the stack sampler and the spool flusher cost the program."""
        own = total = 0.0
        for (pid, tid), s in self.series.items():
            ns = s.run[-1] - s.run[0]
            total += ns
            p = trace.processes.get(pid)
            if p is not None and p.threads.get(tid) in OWN_THREADS:
                own += ns
        return own, total

    def load1(self) -> float | None:
        return round(median(self.loads), 2) if self.loads else None
