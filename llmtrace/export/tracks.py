"""Which timeline track each slice goes on, so that every track nests properly.

Trace viewers draw one thread as one stack of slices: a slice must lie inside the slice
below it or after it. asyncio tasks break that (request spans of many tasks overlap on the
event-loop thread), and so can device intervals of several streams. Spans that would
overlap partially are moved to extra "lanes" of their thread: synthetic tids above any
real one, named after the thread. Request spans get lanes of their own from the start.

Flow events bind to a slice by time. Perfetto binds a flow to the slice on top of its
track's stack, and pops slices that have ended only when the next slice begins, so the
one safe time is inside the span before anything else (a child, an instant, a sample)
starts on its track; chrome://tracing binds to the innermost enclosing slice, which that
time also satisfies. The layout picks that time ("anchor") for each span a flow binds to.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass, field
from operator import attrgetter

from ..timeline import Span, Trace

# Linux tids stay below pid_max (at most 2**22); Perfetto reads tids as uint32.
SYNTHETIC_TID_BASE = 1 << 30
DEVICE_TRACK_NAME = "GPU (CUDA events)"
FLOW_MARGIN_NS = 1000  # keep a flow event this far from a slice edge where the gap allows


@dataclass
class Track:
    """A synthetic track: a lane of real thread `tid`, or a device track (`tid` None)."""

    pid: int
    tid: int | None
    name: str


@dataclass
class Layout:
    """Only the exceptions to "a span is drawn on its own thread", so memory stays small."""

    moved: dict[int, int] = field(default_factory=dict)  # span id -> lane of its thread
    device_track: dict[int, int] = field(default_factory=dict)  # pid -> its device track
    device_moved: dict[int, int] = field(default_factory=dict)  # span id -> extra device lane
    tracks: dict[int, Track] = field(default_factory=dict)  # synthetic tid -> what it is
    anchors: dict[int, int] = field(default_factory=dict)  # span id -> where flows bind to it

    def span_tid(self, span: Span) -> int:
        return self.moved.get(span.span_id, span.tid)

    def device_tid(self, span: Span) -> int:
        return self.device_moved.get(span.span_id) or self.device_track[span.pid]


def anchor_time(start: int, end: int, first_inner: int | None) -> int:
    """A time inside [start, end] before `first_inner` (the first thing that starts inside
    the span on its track), a margin away from both where the room allows. Without room
    (a child starts with the span) it is the start, where viewers bind to that child."""
    room = (end if first_inner is None else min(first_inner, end)) - start
    return start + min(room // 2, FLOW_MARGIN_NS) if room >= 2 else start


class _Lanes:
    """Lanes of one thread (or of one process's device intervals), each a stack of open spans."""

    def __init__(self, device: bool, anchored: Callable[[Span], bool] | None, first_child: dict[int, int]):
        self.start_of = attrgetter("device_start_ns" if device else "start_ns")
        self.end_of = attrgetter("device_end_ns" if device else "end_ns")
        self.device, self.anchored, self.first_child = device, anchored, first_child
        self.stacks: list[list[Span]] = [[]]
        self.open_lane: dict[int, int] = {}  # span id -> lane, for open spans not on lane 0

    def place(self, s: Span) -> int:
        start, end = self.start_of(s), self.end_of(s)
        preferred = self.open_lane.get(s.parent_id) if self.open_lane and not self.device else None
        lane = self._fit(start, end, preferred)
        stack = self.stacks[lane]
        if stack and self.anchored is not None:
            top = stack[-1]
            if top.span_id not in self.first_child and self.anchored(top):
                self.first_child[top.span_id] = start
        stack.append(s)
        if lane:
            self.open_lane[s.span_id] = lane
        return lane

    def _fit(self, start: int, end: int, preferred: int | None) -> int:
        """The preferred lane if the interval nests there, else the first lane where it does."""
        end_of, open_lane = self.end_of, self.open_lane
        candidates = range(len(self.stacks)) if preferred is None else (preferred, *range(len(self.stacks)))
        for lane in candidates:
            stack = self.stacks[lane]
            while stack and end_of(stack[-1]) <= start:
                span_id = stack.pop().span_id
                if open_lane:
                    open_lane.pop(span_id, None)
            if not stack or end_of(stack[-1]) >= end:
                return lane
        self.stacks.append([])
        return len(self.stacks) - 1


def nest(
    spans: list[Span],
    device: bool = False,
    anchored: Callable[[Span], bool] | None = None,
    first_child: dict[int, int] | None = None,
    apart: Callable[[Span], bool] | None = None,
) -> list[int]:
    """Lanes for the spans of one thread (or the device intervals of one process) such that
    each lane nests properly; returns the lane of each span, in the order given.

    A child goes on its parent's lane when it fits there, else on the first lane where it
    fits. Spans that `apart` selects, with everything under them, get lanes of their own,
    numbered -1, -2, ... For spans that `anchored` selects, `first_child[span_id]` gets the
    start of the first span inside it on its lane.
    """
    first_child = first_child if first_child is not None else {}
    lanes = _Lanes(device, anchored, first_child)
    apart_lanes = _Lanes(device, anchored, first_child)
    apart_ids: set[int] = set()
    start_of, end_of = lanes.start_of, lanes.end_of
    order = range(len(spans))
    if not in_order(spans, start_of, end_of):
        order = sorted(order, key=lambda i: (start_of(spans[i]), -end_of(spans[i])))
    lane_of = [0] * len(spans)
    for i in order:
        s = spans[i]
        if apart is not None and (s.parent_id in apart_ids or apart(s)):
            apart_ids.add(s.span_id)
            lane_of[i] = -1 - apart_lanes.place(s)
        else:
            lane_of[i] = lanes.place(s)
    return lane_of


def in_order(spans: list[Span], start_of, end_of) -> bool:
    """Sorted by start, and a span starting with the one before it is not longer (the usual
    case: `Trace.sort()` ordered them), so no sort key list is needed."""
    return all(
        start_of(a) < start_of(b) or start_of(a) == start_of(b) and end_of(a) >= end_of(b)
        for a, b in zip(spans, spans[1:])
    )


def lay_out(trace: Trace, anchored: Callable[[Span], bool]) -> Layout:
    """Tracks for every span and device interval, and anchors for the spans that
    `anchored` selects (those flows bind to)."""
    layout = Layout()
    next_tid = [SYNTHETIC_TID_BASE]

    def new_track(pid: int, tid: int | None, name: str) -> int:
        t = next_tid[0]
        next_tid[0] += 1
        layout.tracks[t] = Track(pid, tid, name)
        return t

    by_thread: dict[tuple[int, int], list[Span]] = {}
    device_by_pid: dict[int, list[Span]] = {}
    for s in trace.spans:
        by_thread.setdefault((s.pid, s.tid), []).append(s)
        if s.device_start_ns is not None:
            device_by_pid.setdefault(s.pid, []).append(s)
    marks = _Marks(trace)

    for (pid, tid), group in by_thread.items():
        lane_tid: dict[int, int] = {}
        first_child: dict[int, int] = {}
        for s, lane in zip(group, nest(group, anchored=anchored, first_child=first_child, apart=_of_a_request)):
            if lane:
                if lane not in lane_tid:
                    kind = f"overlap {lane}" if lane > 0 else f"requests {-lane}"
                    lane_tid[lane] = new_track(pid, tid, f"{_thread_name(trace, pid, tid)} ({kind})")
                layout.moved[s.span_id] = lane_tid[lane]
            if anchored(s):
                first = first_child.get(s.span_id)
                if not lane:  # instants and samples are drawn on the thread itself
                    mark = marks.first(pid, tid, s.start_ns, s.end_ns if first is None else first)
                    first = first if mark is None else mark
                layout.anchors[s.span_id] = anchor_time(s.start_ns, s.end_ns, first)

    for pid, group in sorted(device_by_pid.items()):
        layout.device_track[pid] = new_track(pid, None, DEVICE_TRACK_NAME)
        lane_tid = {}
        for s, lane in zip(group, nest(group, device=True)):
            if lane:
                if lane not in lane_tid:
                    lane_tid[lane] = new_track(pid, None, f"{DEVICE_TRACK_NAME} {lane + 1}")
                layout.device_moved[s.span_id] = lane_tid[lane]
    return layout


def _of_a_request(s: Span) -> bool:
    """Spans of one request (they carry `req`: http.request, tokenize, queue) overlap each
    other and the engine's step loop on the event-loop thread; they get lanes of their own
    so the thread's track keeps the step loop."""
    return "req" in s.attrs


class _Marks:
    """Instants and stack samples, which viewers draw as slices of length 0 on their thread."""

    def __init__(self, trace: Trace):
        self.lists = [_by_time(trace.instants), _by_time(trace.samples)]

    def first(self, pid: int, tid: int, start: int, limit: int) -> int | None:
        """The time of the first mark of thread (pid, tid) in [start, limit). The window is
        the room before a span's first child: short, so scanning other threads' marks in it
        costs little and needs no per-thread index."""
        best = None
        for events in self.lists:
            i = bisect_left(events, start, key=_ts_of)
            while i < len(events) and events[i].ts_ns < (limit if best is None else best):
                e = events[i]
                if e.pid == pid and e.tid == tid:
                    best = e.ts_ns
                    break
                i += 1
        return best


_ts_of = attrgetter("ts_ns")


def _by_time(events: list) -> list:
    """`events` if sorted by time (as `Trace.sort()` leaves them), else a sorted copy."""
    if all(a.ts_ns <= b.ts_ns for a, b in zip(events, events[1:])):
        return events
    return sorted(events, key=_ts_of)


def _thread_name(trace: Trace, pid: int, tid: int) -> str:
    proc = trace.processes.get(pid)
    name = proc.threads.get(tid) if proc is not None else None
    return name or f"thread {tid}"
