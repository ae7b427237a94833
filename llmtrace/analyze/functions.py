"""Which functions a stage spends its time in: nested spans, foreign function events
(viztracer's complete events) and stack samples (in-process sampler, py-spy) that lie
inside the steps' critical-path stage spans, as `Call`s a rule can select and sum."""
from __future__ import annotations

import bisect
import re
from collections import defaultdict
from dataclasses import dataclass

from ..trace import Span, Trace
from .breakdown import MODEL_STAGES, Breakdown, is_host_side
from .index import TraceIndex

EXAMPLE_STEPS = 5


@dataclass(slots=True)
class Call:
    """One nested span or foreign function call inside a critical-path stage span."""

    stage: str  # the breakdown stage it lies in
    step: int
    pid: int
    start: int
    end: int
    name: str
    source: str  # "span" (nested llmtrace span) or the foreign tool (e.g. "viztracer")
    host_side: bool  # host work (in a model stage: not model compute)
    span: Span | None = None  # the nested span (None for foreign events)


@dataclass
class FunctionStat:
    name: str
    stage: str
    total_ns: int
    count: int
    steps: list[int]
    sources: list[str]

    def example_steps(self) -> list[int]:
        return self.steps[:EXAMPLE_STEPS]


def covered(calls: list[Call]) -> tuple[int, dict[int, int]]:
    """Union time of `calls` (nested or recursive calls counted once): (total ns, {step: ns})."""
    per_step: dict[int, int] = defaultdict(int)
    for (pid, step), group in _group(calls, lambda c: (c.pid, c.step)).items():
        end = None
        for c in sorted(group, key=lambda c: c.start):
            if end is None or c.start >= end:
                per_step[step] += c.end - c.start
                end = c.end
            elif c.end > end:
                per_step[step] += c.end - end
                end = c.end
    return sum(per_step.values()), dict(per_step)


def _group(items, key) -> dict:
    out = defaultdict(list)
    for it in items:
        out[key(it)].append(it)
    return out


class FunctionIndex:
    """Which functions dominate stage X: nested spans, foreign complete events ('X', e.g.
    viztracer) and stack samples (in-process sampler, py-spy) that lie inside the stage's
    critical-path spans (same pid and thread). A sample stands for one sampling interval
    of each frame below the frames every sample of that stage shares (the step loop)."""

    def __init__(self, index: TraceIndex, breakdown: Breakdown, trace: Trace):
        self.calls: list[Call] = []
        foreign = _foreign_by_thread(trace.foreign_events)
        samples = _samples_by_thread(trace.samples)
        sampled: dict[str, list[tuple]] = defaultdict(list)
        for sc in breakdown.steps:
            for stage, s in sc.stage_spans:
                self._nested(index, stage, s, sc.step)
                self._foreign(foreign, stage, s, sc.step)
                for smp, interval in _inside(samples, s):
                    sampled[stage].append((sc.step, smp, interval))
        for stage, rows in sampled.items():
            self._sampled(stage, rows)

    def _sampled(self, stage: str, rows: list[tuple]) -> None:
        stacks = [smp.stack for _, smp, _ in rows]
        shared = _common_prefix(stacks)
        for step, smp, interval in rows:
            a, b = smp.ts_ns - interval // 2, smp.ts_ns + interval // 2
            for frame in smp.stack[shared:]:
                self.calls.append(Call(stage, step, smp.pid, a, b, frame_name(frame), f"samples:{smp.source}",
                                       stage not in MODEL_STAGES))

    def _nested(self, index: TraceIndex, stage: str, s: Span, step: int) -> None:
        model = stage in MODEL_STAGES
        for d in index.descendants(s):
            host = not model or is_host_side(d, stage)
            self.calls.append(Call(stage, step, d.pid, d.start_ns, d.end_ns, d.name, "span", host, d))

    def _foreign(self, foreign: dict, stage: str, s: Span, step: int) -> None:
        evs = foreign.get((s.pid, s.tid))
        if not evs:
            return
        starts, rows = evs
        i = bisect.bisect_left(starts, s.start_ns)
        while i < len(starts) and starts[i] < s.end_ns:
            start, end, name, source = rows[i]
            if end <= s.end_ns:
                self.calls.append(Call(stage, step, s.pid, start, end, name, source, stage not in MODEL_STAGES))
            i += 1

    def select(self, pattern: re.Pattern | None = None, stage: str | None = None,
               host_side: bool | None = None) -> list[Call]:
        return [c for c in self.calls if (stage is None or c.stage == stage)
                and (pattern is None or pattern.search(c.name))
                and (host_side is None or c.host_side == host_side)]

    def stats(self, calls: list[Call]) -> list[FunctionStat]:
        """Per (stage, name) totals of `calls`, largest first."""
        out = []
        for (stage, name), group in _group(calls, lambda c: (c.stage, c.name)).items():
            total, per_step = covered(group)
            out.append(FunctionStat(name, stage, total, len(group), sorted(per_step),
                                    sorted({c.source for c in group})))
        return sorted(out, key=lambda f: -f.total_ns)


def frame_name(frame: str) -> str:
    """'module:Class.func:123' (sampler label) -> 'module.Class.func'."""
    parts = frame.split(":")
    if len(parts) > 1 and parts[-1].isdigit():
        parts.pop()
    return ".".join(parts)


def _common_prefix(stacks: list[tuple[str, ...]]) -> int:
    if len(stacks) < 2:
        return len(stacks[0]) if stacks else 0
    n = min(len(st) for st in stacks)
    first = stacks[0]
    for i in range(n):
        # the innermost sampled frame carries its line number; compare by function
        if any(frame_name(st[i]) != frame_name(first[i]) for st in stacks):
            return i
    return n


def _samples_by_thread(samples) -> dict:
    """{(pid, tid): ([ts...], [(sample, interval_ns)...])}; interval = median gap of that thread."""
    rows = defaultdict(list)
    for smp in samples:
        rows[(smp.pid, smp.tid)].append(smp)
    out = {}
    for key, lst in rows.items():
        lst.sort(key=lambda x: x.ts_ns)
        gaps = sorted(b.ts_ns - a.ts_ns for a, b in zip(lst, lst[1:]))
        interval = gaps[len(gaps) // 2] if gaps else 0
        out[key] = ([x.ts_ns for x in lst], [(x, interval) for x in lst])
    return out


def _inside(by_thread: dict, s: Span):
    rows = by_thread.get((s.pid, s.tid))
    if not rows:
        return []
    lo, hi = bisect.bisect_left(rows[0], s.start_ns), bisect.bisect_left(rows[0], s.end_ns)
    return rows[1][lo:hi]


def _foreign_by_thread(events: list[dict]) -> dict:
    """{(pid, tid): ([start_ns...], [(start, end, name, source)...])} of complete events."""
    rows = defaultdict(list)
    for ev in events:
        if ev.get("ph") != "X" or "dur" not in ev:
            continue
        start = int(float(ev["ts"]) * 1000)
        rows[(int(ev.get("pid", 0)), int(ev.get("tid", 0)))].append(
            (start, start + int(float(ev["dur"]) * 1000), str(ev.get("name", "?")), str(ev.get("cat") or "foreign")))
    out = {}
    for key, lst in rows.items():
        lst.sort()
        out[key] = ([r[0] for r in lst], lst)
    return out
