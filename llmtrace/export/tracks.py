"""Which timeline track each slice goes on, so that every track nests properly.

Trace viewers draw one thread as one stack of slices: a slice must lie inside the slice
below it or after it. asyncio tasks break that (request spans of many tasks overlap on the
event-loop thread), and so can device intervals of several streams. Spans that would
overlap partially are moved to extra "lanes" of their thread: synthetic tids above any
real one, named after the thread. Flow arrows bind to the innermost slice open at the
flow event's time, so the layout also picks, for each span a flow binds to, an anchor
time inside it that none of its children on its lane covers.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from operator import attrgetter
from typing import Callable

from ..trace import Span, Trace

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


class Anchor:
    """The time inside [start, end], outside the children (given in start order), nearest to
    `near`, kept a margin away from slice edges where the gap allows."""

    __slots__ = ("start", "end", "near", "prev", "best")

    def __init__(self, start: int, end: int, near: int):
        self.start, self.end, self.near, self.prev, self.best = start, end, near, start, None

    def child(self, a: int, b: int) -> None:
        self._gap(self.prev, a)
        self.prev = max(self.prev, b)

    def result(self) -> int:
        self._gap(self.prev, self.end)
        return self.start if self.best is None else self.best

    def _gap(self, a: int, b: int) -> None:
        if b <= a:
            return
        margin = min((b - a) // 2, FLOW_MARGIN_NS)
        t = min(max(self.near, a + margin), b - margin)
        if self.best is None or abs(t - self.near) < abs(self.best - self.near):
            self.best = t


class _Lanes:
    """Lanes of one thread (or of one process's device intervals), each a stack of open spans."""

    def __init__(self, device: bool, near: Callable[[Span], int | None] | None, anchors: dict[int, int]):
        self.start_of = attrgetter("device_start_ns" if device else "start_ns")
        self.end_of = attrgetter("device_end_ns" if device else "end_ns")
        self.device, self.near, self.anchors = device, near, anchors
        self.stacks: list[list[Span]] = [[]]
        self.open_lane: dict[int, int] = {}  # span id -> lane, for open spans not on lane 0
        self.open_anchor: dict[int, Anchor] = {}

    def place(self, s: Span) -> int:
        start, end = self.start_of(s), self.end_of(s)
        preferred = self.open_lane.get(s.parent_id) if self.open_lane and not self.device else None
        lane = self._fit(start, end, preferred)
        stack = self.stacks[lane]
        if stack and self.open_anchor:
            parent_anchor = self.open_anchor.get(stack[-1].span_id)
            if parent_anchor is not None:
                parent_anchor.child(start, end)
        near = self.near(s) if self.near is not None else None
        if near is not None:
            self.open_anchor[s.span_id] = Anchor(start, end, near)
        stack.append(s)
        if lane:
            self.open_lane[s.span_id] = lane
        return lane

    def close(self) -> None:
        for stack in self.stacks:
            while stack:
                self._pop(stack)

    def _fit(self, start: int, end: int, preferred: int | None) -> int:
        """The preferred lane if the interval nests there, else the first lane where it does."""
        end_of = self.end_of
        candidates = range(len(self.stacks)) if preferred is None else (preferred, *range(len(self.stacks)))
        for lane in candidates:
            stack = self.stacks[lane]
            while stack and end_of(stack[-1]) <= start:
                self._pop(stack)
            if not stack or end_of(stack[-1]) >= end:
                return lane
        self.stacks.append([])
        return len(self.stacks) - 1

    def _pop(self, stack: list[Span]) -> None:
        span_id = stack.pop().span_id
        if self.open_lane:
            self.open_lane.pop(span_id, None)
        if self.open_anchor:
            a = self.open_anchor.pop(span_id, None)
            if a is not None:
                self.anchors[span_id] = a.result()


def nest(spans: list[Span], device: bool = False, near: Callable[[Span], int | None] | None = None,
         anchors: dict[int, int] | None = None) -> list[int]:
    """Lanes for the spans of one thread (or the device intervals of one process) such that
    each lane nests properly; returns the lane of each span, in the order given.

    A child goes on its parent's lane when it fits there, else on the first lane where it
    fits. For spans where `near(span)` is not None, `anchors[span_id]` gets the time nearest
    to it inside the span and outside its children on its lane.
    """
    lanes = _Lanes(device, near, anchors if anchors is not None else {})
    order = range(len(spans))
    if not _in_order(spans, lanes.start_of, lanes.end_of):
        order = sorted(order, key=lambda i: (lanes.start_of(spans[i]), -lanes.end_of(spans[i])))
    lane_of = [0] * len(spans)
    for i in order:
        lane_of[i] = lanes.place(spans[i])
    lanes.close()
    return lane_of


def _in_order(spans: list[Span], start_of, end_of) -> bool:
    """Sorted by start, and a span starting with the one before it is not longer (the usual
    case: `Trace.sort()` ordered them), so no sort key list is needed."""
    return all(start_of(a) < start_of(b) or start_of(a) == start_of(b) and end_of(a) >= end_of(b)
               for a, b in zip(spans, spans[1:]))


def lay_out(trace: Trace, near: Callable[[Span], int | None]) -> Layout:
    """Tracks for every span and device interval, and anchors for the spans flows bind to
    (those where `near(span)`, the time the anchor should be close to, is not None)."""
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

    for (pid, tid), group in by_thread.items():
        lane_tid: dict[int, int] = {}
        for s, lane in zip(group, nest(group, near=near, anchors=layout.anchors)):
            if lane:
                if lane not in lane_tid:
                    lane_tid[lane] = new_track(pid, tid, f"{_thread_name(trace, pid, tid)} (overlap {lane})")
                layout.moved[s.span_id] = lane_tid[lane]

    for pid, group in sorted(device_by_pid.items()):
        layout.device_track[pid] = new_track(pid, None, DEVICE_TRACK_NAME)
        lane_tid = {}
        for s, lane in zip(group, nest(group, device=True)):
            if lane:
                if lane not in lane_tid:
                    lane_tid[lane] = new_track(pid, None, f"{DEVICE_TRACK_NAME} {lane + 1}")
                layout.device_moved[s.span_id] = lane_tid[lane]
    return layout


def _thread_name(trace: Trace, pid: int, tid: int) -> str:
    proc = trace.processes.get(pid)
    name = proc.threads.get(tid) if proc is not None else None
    return name or f"thread {tid}"
