"""One model call made of several outermost module calls.

Automatic instrumentation records a thread's outermost `nn.Module.__call__` as `forward`.
A loop that calls `model.forward(ids)` itself (no `__call__` on the model), or that calls
the model's parts one after another (`model.model(...)` then `model.lm_head(...)`, a
model then a sampler module), makes several outermost calls per step: an embedding, each
block, a head. Taken one by one, each would be a step (a decode loop of 384 tokens came
out as 1,914 steps of 0.19 ms). Here such runs become one `forward` span each, the calls
its children: on one thread, the outermost forwards of one parent split at every call of
one module (`fn`), when nearly every piece holds the same modules in the same order; of
the modules that split them so, the one after the longest pauses (the step's host work
lies between model calls, not between a model's layers).
"""

from __future__ import annotations

import bisect
import dataclasses
import statistics
from collections import Counter, defaultdict

from .. import names
from ..timeline import Span, Trace

SAME_SHAPE = 0.8  # the share of pieces that must call the same modules in the same order
_GROUP_ID = 1 << 61  # ids of the spans made here (the step windows' are 1 << 62)


def grouped(trace: Trace) -> Trace:
    """`trace`, or, when it holds such runs, a copy in which each is one `forward` enclosing
    its calls. The recorded spans are left as they are (a live view shares them)."""
    by_thread: dict[tuple[int, int], list[Span]] = defaultdict(list)
    by_id = {s.span_id: s for s in trace.spans}
    for s in trace.spans:
        parent = by_id.get(s.parent_id)
        if s.stage == names.FORWARD and (parent is None or parent.stage != names.FORWARD):
            by_thread[(s.pid, s.tid)].append(s)
    made: list[Span] = []
    for calls in by_thread.values():
        for piece in _pieces(calls) or ():
            if len(piece) > 1:
                made.append(_enclose(piece, _GROUP_ID | len(made)))
    if not made:
        return trace
    spans = list(trace.spans)
    starts = [s.start_ns for s in spans]  # sorted: trace.spans is, by start
    for m in made:  # spans inside a model call are its own (a sync.wait between its layers)
        _adopt(spans, starts, m)
    spans += made
    spans.sort(key=lambda s: (s.start_ns, -s.end_ns))
    return dataclasses.replace(trace, spans=spans)


def _pieces(calls: list[Span]) -> list[list[Span]] | None:
    """The model calls `calls` (one thread's outermost forwards, by start) are made of, or
    None when each is one already (one module), or no split repeats one shape."""
    fns = {str(c.attrs.get(names.A_FUNCTION)) for c in calls}
    if len(fns) < 2:
        return None
    best, best_pause = None, -1.0
    for head in fns:
        pieces = _split(calls, head)
        shapes = Counter(tuple(str(c.attrs.get(names.A_FUNCTION)) for c in p) for p in pieces)
        shape, n = shapes.most_common(1)[0]
        if len(pieces) < 2 or len(shape) < 2 or n < SAME_SHAPE * len(pieces):
            continue
        pause = statistics.median(b[0].start_ns - a[-1].end_ns for a, b in zip(pieces, pieces[1:]))
        if pause > best_pause:
            best, best_pause = pieces, pause
    return best


def _split(calls: list[Span], head: str) -> list[list[Span]]:
    """`calls` cut before every call of module `head` and wherever the parent changes."""
    pieces: list[list[Span]] = []
    for c in calls:
        if not pieces or str(c.attrs.get(names.A_FUNCTION)) == head or c.parent_id != pieces[-1][0].parent_id:
            pieces.append([c])
        else:
            pieces[-1].append(c)
    return pieces


def _enclose(piece: list[Span], span_id: int) -> Span:
    first, last = piece[0], piece[-1]
    attrs = {k: v for k, v in first.attrs.items() if k in (names.A_BATCH, names.A_TOKENS)}
    attrs[names.A_FUNCTION] = "+".join(dict.fromkeys(str(c.attrs.get(names.A_FUNCTION)) for c in piece))
    s = Span(
        names.FORWARD,
        names.FORWARD,
        first.pid,
        first.tid,
        first.start_ns,
        last.end_ns,
        span_id,
        parent_id=first.parent_id,
        step=first.step,
        attrs=attrs,
    )
    if first.device_start_ns is not None and last.device_end_ns is not None:
        s.device_start_ns, s.device_end_ns = first.device_start_ns, last.device_end_ns
    return s


def _adopt(spans: list[Span], starts: list[int], outer: Span) -> None:
    """Spans of `outer`'s thread and parent that lie within it become its children (copies)."""
    i = bisect.bisect_left(starts, outer.start_ns)
    while i < len(spans) and spans[i].start_ns < outer.end_ns:
        s = spans[i]
        if s.pid == outer.pid and s.tid == outer.tid and s.parent_id == outer.parent_id and s.end_ns <= outer.end_ns:
            spans[i] = dataclasses.replace(s, parent_id=outer.span_id)
        i += 1
