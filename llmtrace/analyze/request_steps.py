"""Which steps served each HTTP request, for programs that never say so (no `req`
attribute, no `token` instants): two links any pipeline has, found without its help.
- hand-off: inside the request, its code put an object on an in-process queue
  (`handoff.put`, auto/handoff.py) and the step loop took that object (`handoff.get`, same
  key): the request is served by the steps whose model ran after it was taken, on that
  thread (else in that process), until the request ended;
- else, same thread: steps whose model ran on the request's thread during the request (a
  handler that runs the decode loop itself), where the thread served one request at a
  time (an event loop's concurrent requests share a thread and prove nothing).
For each linked request: its first served step, its queue time (put to get) and a TTFT
bound: the end of its first served step, the step that ran its prefill and so produced
its first token. Requests whose work crossed a process boundary (the object was copied)
stay unlinked.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from .. import names
from ..timeline import Instant, Span
from .breakdown import MODEL_STAGES, StepCost
from .index import TraceIndex

SAME_THREAD, HANDOFF = "same thread", "hand-off"


@dataclass(frozen=True, slots=True)
class RequestLink:
    first_step: int
    steps: int  # steps that served it
    ttft_ns: int  # request start -> end of the first served step
    queue_ns: int | None  # put -> get (hand-off only)
    by: str  # SAME_THREAD or HANDOFF


class _Steps:
    """Steps by thread and by process, in the order their model ran, for range lookups."""

    def __init__(self, steps: list[StepCost]):
        by_thread, by_pid = defaultdict(list), defaultdict(list)
        for sc in steps:
            by_thread[(sc.root.pid, sc.root.tid)].append(sc)
            by_pid[sc.root.pid].append(sc)
        self.by_thread = {k: _Group(v) for k, v in by_thread.items()}
        self.by_pid = {k: _Group(v) for k, v in by_pid.items()}

    def served(self, pid: int, tid: int, taken: int, until: int) -> list[StepCost]:
        """Steps of (pid, tid), else of pid, whose model ran after `taken` and before `until`."""
        group = self.by_thread.get((pid, tid)) or self.by_pid.get(pid)
        return group.computed(taken, until) if group else []


class _Group:
    def __init__(self, steps: list[StepCost]):
        self.steps = sorted(steps, key=_compute_start)
        self.starts = [_compute_start(sc) for sc in self.steps]

    def computed(self, lo: int, hi: int) -> list[StepCost]:
        """The steps whose model started in [lo, hi)."""
        return self.steps[bisect.bisect_left(self.starts, lo) : bisect.bisect_left(self.starts, hi)]


def _compute_start(sc: StepCost) -> int:
    """When a step's model began (a request taken later in the step waits for the next
    one), or its start where no model stage lies on its critical path."""
    return min((s.start_ns for label, s in sc.stage_spans if label in MODEL_STAGES), default=sc.root.start_ns)


def request_links(index: TraceIndex, steps: list[StepCost]) -> dict[int, RequestLink]:
    """{http.request span id: how steps served it}, for the requests that can be linked."""
    requests = index.by_name.get(names.HTTP_REQUEST, ())
    if not requests or not steps:
        return {}
    by_steps = _Steps(steps)
    links = {}
    for r, put, get in _handoffs(index):
        served = by_steps.served(get.pid, get.tid, get.ts_ns, r.end_ns)
        if served:
            links[r.span_id] = RequestLink(
                served[0].step, len(served), served[0].root.end_ns - r.start_ns, max(0, get.ts_ns - put.ts_ns), HANDOFF
            )
    for r in _one_at_a_time(requests):
        own = by_steps.by_thread.get((r.pid, r.tid))
        inside = own.computed(r.start_ns, r.end_ns) if own else []
        if inside and r.span_id not in links:
            links[r.span_id] = RequestLink(
                inside[0].step, len(inside), inside[0].root.end_ns - r.start_ns, None, SAME_THREAD
            )
    return links


def _one_at_a_time(requests: Iterable[Span]) -> list[Span]:
    """The requests that overlap no other request of their thread."""
    by_thread: dict[tuple[int, int], list[Span]] = defaultdict(list)
    for r in requests:
        by_thread[(r.pid, r.tid)].append(r)
    alone = []
    for group in by_thread.values():
        group.sort(key=lambda r: r.start_ns)
        ended = 0  # the latest end of the requests before
        for i, r in enumerate(group):
            if ended <= r.start_ns and (i + 1 == len(group) or r.end_ns <= group[i + 1].start_ns):
                alone.append(r)
            ended = max(ended, r.end_ns)
    return alone


def _handoffs(index: TraceIndex) -> list[tuple[Span, Instant, Instant]]:
    """(request, its put, the matching get) for every hand-off made inside a request (the
    first of a request's hand-offs: what admitted it)."""
    gets = {i.attrs.get(names.A_HANDOFF): i for i in index.instants.get(names.I_HANDOFF_GET, ())}
    out, seen = [], set()
    for put in sorted(index.instants.get(names.I_HANDOFF_PUT, ()), key=lambda i: i.ts_ns):
        get = gets.get(put.attrs.get(names.A_HANDOFF))
        request = _enclosing_request(index, put)
        if get is not None and get.pid == put.pid and request is not None and request.span_id not in seen:
            seen.add(request.span_id)
            out.append((request, put, get))
    return out


def _enclosing_request(index: TraceIndex, put: Instant) -> Span | None:
    """The http.request span a put was made in: up its parent spans (a task's own chain,
    where concurrent requests share one thread)."""
    return next((s for s in index.ancestors(put.parent_id) if s.name == names.HTTP_REQUEST), None)
