"""Device busy time of the model spans, from the GPU's own records of its kernels and copies
(CUPTI activity, read through torch.profiler's Kineto), for a window of model spans.

A model span's CUDA-event interval (gpu.py) also counts the time the device sits idle
between kernels: a few µs per kernel inside a CUDA graph, and in eager mode whatever the
host's kernel launches leave idle, up to half the step. That launch-bound idle time is
overhead outside the model, so the breakdown needs the busy part separately.

How: torch.profiler with CUDA activities only starts when device timing is installed and
collects for the first N model spans (`LLMTRACE_DEVICE_ACTIVITY=N`); once the last of them
has finished on the device, the spool's flush thread stops it and reads the records (the
process's final stop does, for a window never filled). Switching collection off with
torch's toggle_collection_dynamic instead lost every record (torch 2.11, H100: 0 events).
Collecting costs 3-7% of the step while it lasts (gpu_device_busy.py). Each kernel,
memcpy and memset belongs to the model span whose host interval holds the runtime call
that launched it (same correlation id; a graph's kernels share their cudaGraphLaunch's),
the union of a span's intervals is its busy time, and a `device.busy` instant per span
carries it (parent: the span; attrs busy_ns, kernels, launches). Kineto stamps host events with the
Unix clock; llmtrace's clock is CLOCK_MONOTONIC: the offset is read around the start.
"""

from __future__ import annotations

import os
import sys
import time
from bisect import bisect_right
from dataclasses import dataclass

from . import names, recorder, sink
from .spool_format import INSTANT

ENV = "LLMTRACE_DEVICE_ACTIVITY"  # model spans to cover (0 or unset: off)
BUSY_KINDS = ("kernel", "gpu_memcpy", "gpu_memset")  # Kineto activity types the device executes
LAUNCH_KINDS = ("cuda_runtime", "cuda_driver")  # host API calls that launch them


def window_from_env() -> int:
    value = os.environ.get(ENV, "0")
    try:
        return max(0, int(value))
    except ValueError:
        print(f"llmtrace: {ENV}={value!r} is not a number of model spans; device activity off", file=sys.stderr)
        return 0


@dataclass(slots=True)
class ModelSpan:
    """A model span of the window: its host interval (llmtrace clock) and identity."""

    start_ns: int
    end_ns: int
    span_id: int
    step: int


@dataclass(slots=True)
class SpanBusy:
    span: ModelSpan
    busy_ns: int
    kernels: int
    launches: int


def clock_offset_ns() -> int:
    """Unix ns minus CLOCK_MONOTONIC ns, from the tightest of a few paired readings."""
    best = None
    for _ in range(5):
        a = time.perf_counter_ns()
        u = time.time_ns()
        b = time.perf_counter_ns()
        if best is None or b - a < best[0]:
            best = (b - a, u - (a + b) // 2)
    return best[1]


def union_ns(intervals: list[tuple[int, int]]) -> int:
    total, hi = 0, None
    for a, b in sorted(intervals):
        if hi is None or a > hi:
            total += b - a
            hi = b
        elif b > hi:
            total += b - hi
            hi = b
    return total


def busy_by_span(events, spans: list[ModelSpan], offset_ns: int) -> tuple[list[SpanBusy], int]:
    """Each span's busy time from Kineto events (name, activity_type, start_ns, duration_ns,
    correlation_id); a launch maps to the innermost span open at its host time. Returns the
    spans with any device work, and how many device records launched during the window had
    no span (device work outside the model spans)."""
    launch_at = {
        e.correlation_id(): e.start_ns() - offset_ns
        for e in events
        if e.activity_type() in LAUNCH_KINDS and e.correlation_id()
    }
    spans = sorted(spans, key=lambda s: s.start_ns)
    starts = [s.start_ns for s in spans]
    work: dict[int, list[tuple[int, int]]] = {}
    launches: dict[int, set[int]] = {}
    lo, hi = (spans[0].start_ns, max(s.end_ns for s in spans)) if spans else (0, -1)
    outside = 0
    for e in events:
        if e.activity_type() not in BUSY_KINDS:
            continue
        t = launch_at.get(e.correlation_id())
        i = _span_at(spans, starts, t)
        if i is None:
            outside += t is not None and lo <= t <= hi
            continue
        work.setdefault(i, []).append((e.start_ns(), e.start_ns() + e.duration_ns()))
        launches.setdefault(i, set()).add(e.correlation_id())
    out = [SpanBusy(spans[i], union_ns(iv), len(iv), len(launches[i])) for i, iv in sorted(work.items())]
    return out, outside


def _span_at(spans: list[ModelSpan], starts: list[int], t: int | None) -> int | None:
    """Index of the latest-starting span that holds host time t (the innermost of nested ones)."""
    if t is None:
        return None
    i = bisect_right(starts, t) - 1
    while i >= 0:
        if spans[i].end_ns >= t:
            return i
        if spans[i].start_ns < t - 10_000_000_000:  # no model span lasts 10 s: stop looking back
            return None
        i -= 1
    return None


class Window:
    """One process's device-activity window over its first `size` model spans."""

    def __init__(self, size: int, profiler=None):
        """profiler: torch.profiler.profile's surface (a stand-in in tests); default CUDA activities."""
        self.size = size
        self.spans: list[ModelSpan] = []
        self.complete = False  # every span's device work is done: its records can be read
        self.emitted = False
        self.offset_ns = clock_offset_ns()
        self.profiler = profiler if profiler is not None else _cuda_profiler()
        self.profiler.start()
        sink.on_final_stop(self.emit)

    def add(self, start_ns: int, end_ns: int, span_id: int, step: int) -> bool:
        """A model span of the window finished on the host; False once the window is full."""
        if len(self.spans) >= self.size:
            return False
        self.spans.append(ModelSpan(start_ns, end_ns, span_id, step))
        return True

    def device_done(self, span_id: int) -> None:
        """The device finished `span_id`'s work: after the window's last, the window is complete."""
        if len(self.spans) >= self.size and span_id == self.spans[-1].span_id:
            self.complete = True

    def emit(self) -> None:
        """Read the records (once complete, from the flush thread; else at the final stop)
        and emit a `device.busy` instant per span."""
        if self.emitted:
            return
        self.emitted = True
        self.profiler.stop()
        events = self.profiler.profiler.kineto_results.events()
        found, outside = busy_by_span(events, self.spans, self.offset_ns)
        name, stage = recorder.intern(names.I_DEVICE_BUSY), recorder.intern("device")
        t = time.perf_counter_ns()
        for b in found:
            recorder.emit(
                INSTANT,
                name,
                stage,
                t,
                t,
                0,
                b.span.span_id,
                0,
                b.span.step,
                {names.A_BUSY_NS: b.busy_ns, names.A_KERNELS: b.kernels, names.A_LAUNCHES: b.launches},
            )
        if outside:
            recorder.counter(names.C_DEVICE_WORK_OUTSIDE, outside)


def _cuda_profiler():
    from torch.profiler import ProfilerActivity, profile

    return profile(activities=[ProfilerActivity.CUDA])
