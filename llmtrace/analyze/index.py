"""Lookups over a `Trace` that the breakdown, the metrics and the rules share."""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Iterator

from ..timeline import Instant, Span, Trace


class TraceIndex:
    def __init__(self, trace: Trace):
        self.trace = trace
        self.by_id: dict[int, Span] = {s.span_id: s for s in trace.spans}
        self.children: dict[int, list[Span]] = defaultdict(list)
        self.by_name: dict[str, list[Span]] = defaultdict(list)
        self.by_stage: dict[str, list[Span]] = defaultdict(list)
        for s in trace.spans:  # trace.spans is sorted by start, so every list is too
            if s.parent_id in self.by_id:
                self.children[s.parent_id].append(s)
            self.by_name[s.name].append(s)
            self.by_stage[s.stage].append(s)
        self.instants: dict[str, list[Instant]] = defaultdict(list)
        for i in trace.instants:
            self.instants[i.name].append(i)
        self._counters: dict[str, tuple[list[int], list[float]]] = {}
        self._top: dict[tuple[int, int], list[Span]] | None = None
        for c in trace.counters:
            ts, vals = self._counters.setdefault(c.name, ([], []))
            ts.append(c.ts_ns)
            vals.append(c.value)

    def top_level(self, pid: int, tid: int) -> list[Span]:
        """One thread's spans whose parent is not a span of that thread, by start."""
        if self._top is None:
            self._top = defaultdict(list)
            for s in self.trace.spans:
                p = self.by_id.get(s.parent_id)
                if p is None or p.tid != s.tid or p.pid != s.pid:
                    self._top[(s.pid, s.tid)].append(s)
        return self._top.get((pid, tid), [])

    def in_window(self, spans: list[Span], lo: int, hi: int, around: Span | None = None) -> list[Span]:
        """The spans of `spans` (one thread's, by start) overlapping [lo, hi), each one that
        holds the whole window, or holds the window's own model span `around`, replaced by
        its own children there: a request handler around a decode loop (whether or not it
        ends inside the window), or an asyncio task's sleep beside the loop, is not the
        window's work."""
        holders = {a.span_id for a in self.ancestors(around.parent_id)} if around is not None else set()
        return self._in_window(spans, lo, hi, holders, around)

    def _in_window(self, spans: list[Span], lo: int, hi: int, holders: set[int], around: Span | None) -> list[Span]:
        out = []
        for s in spans:
            if s.end_ns <= lo or s.start_ns >= hi:
                continue
            if s.span_id in holders or s.start_ns <= lo and s.end_ns >= hi and s is not around:
                out += self._in_window(self.children.get(s.span_id, []), lo, hi, holders, around)
            else:
                out.append(s)
        return out

    def add_synthetic(self, root: Span, children: list[Span]) -> None:
        """A step root the analyzer made up (an inferred step window): findable by id, with
        `children` as its stages; not part of the trace."""
        self.by_id[root.span_id] = root
        self.children[root.span_id] = children

    def ancestors(self, parent_id: int) -> Iterator[Span]:
        """The span `parent_id` names and its parents, innermost first (a record's enclosing spans)."""
        p = self.by_id.get(parent_id)
        while p is not None:
            yield p
            p = self.by_id.get(p.parent_id)

    def is_root(self, s: Span) -> bool:
        return s.parent_id not in self.by_id

    def descendants(self, s: Span) -> Iterator[Span]:
        stack = list(reversed(self.children.get(s.span_id, ())))
        while stack:
            d = stack.pop()
            yield d
            stack.extend(reversed(self.children.get(d.span_id, ())))

    def has_counter(self, name: str) -> bool:
        return name in self._counters

    def counter_series(self, name: str) -> tuple[list[int], list[float]]:
        return self._counters.get(name, ([], []))

    def counter_at(self, name: str, ts_ns: int) -> float | None:
        """The counter's last value at or before `ts_ns` (None before its first sample)."""
        ts, vals = self._counters.get(name, ((), ()))
        i = bisect.bisect_right(ts, ts_ns) - 1
        return vals[i] if i >= 0 else None

    def counter_max(self, name: str) -> float | None:
        vals = self._counters.get(name, (None, None))[1]
        return max(vals) if vals else None
