"""Per-thread CPU accounting, for findings about CPU starvation and GIL contention.

Linux keeps, per thread, the time it ran on a CPU and the time it waited runnable on a
run queue (/proc/<pid>/task/<tid>/schedstat: on_cpu_ns runqueue_ns timeslices). A step
thread that waits on the run queue is starved of CPUs (other processes, more threads than
cores); one that is off the CPU and not runnable, with no recorded wait (a receive, a
sleep, a device sync) to explain it, is blocked on something unrecorded: in a Python
process whose other threads ran meanwhile, most likely the GIL.

The spool's flush thread reads every thread's counters every INTERVAL_NS into the batch
meta (`CPU_KEY`: {"ns": when, "load1": the machine's 1-minute load, "threads": {tid:
[on_cpu_ns, runqueue_ns]}}); the analyzer interpolates them over step windows. Reading
costs ~5 us per thread, 20 times a second. Elsewhere than Linux: nothing is recorded.
"""

from __future__ import annotations

import os
import time

CPU_KEY = "cpu"
INTERVAL_NS = 50_000_000
_TASKS = "/proc/self/task"


def read_threads() -> dict[str, list[int]]:
    """{tid: [on_cpu_ns, runqueue_ns]} of this process's threads ({} without schedstat)."""
    try:
        tids = os.listdir(_TASKS)
    except OSError:
        return {}
    out = {}
    for tid in tids:
        try:  # os.open/read: a file object costs 3x as much, 20 times a second per thread
            fd = os.open(f"{_TASKS}/{tid}/schedstat", os.O_RDONLY)
            try:
                run, wait = os.read(fd, 96).split()[:2]
            finally:
                os.close(fd)
            out[tid] = [int(run), int(wait)]
        except (OSError, ValueError):
            continue  # the thread ended meanwhile
    return out


class CpuSampler:
    """Called from the flush loop: a meta entry every INTERVAL_NS, else None."""

    def __init__(self):
        self.next_ns = 0
        self.available = os.path.isdir(_TASKS)

    def due(self) -> dict | None:
        now = time.perf_counter_ns()
        if not self.available or now < self.next_ns:
            return None
        self.next_ns = now + INTERVAL_NS
        threads = read_threads()
        if not threads:
            self.available = False
            return None
        return {"ns": now, "load1": os.getloadavg()[0], "threads": threads}


def machine() -> dict:
    """What the header says of the machine: the CPUs this process may run on."""
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count() or 0
    return {"cpu_count": os.cpu_count() or 0, "cpus_usable": usable}
