"""What a rule gets: the trace, its indexes, the breakdown, the serving metrics, and the
functions seen inside each stage (from nested spans and from foreign function-level
events such as viztracer's), plus the `Suggestion` a rule returns.
"""
from __future__ import annotations

import bisect
import re
from collections import defaultdict
from dataclasses import dataclass

from ..trace import Span, Trace
from .breakdown import MODEL_STAGES, Breakdown, StepCost, is_host_side
from .index import TraceIndex
from .metrics import serving_metrics

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


@dataclass
class Suggestion:
    id: str
    title: str
    stage: str
    evidence: dict
    est_saving_ms_per_token: float
    est_speedup: float
    fix: str

    def to_dict(self) -> dict:
        return {"id": self.id, "title": self.title, "stage": self.stage, "evidence": self.evidence,
                "est_saving_ms_per_token": self.est_saving_ms_per_token, "est_speedup": self.est_speedup,
                "fix": self.fix}


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


class Context:
    def __init__(self, trace: Trace):
        self.trace = trace
        self.index = TraceIndex(trace)
        self.breakdown = Breakdown.of(self.index)
        self.metrics = serving_metrics(self.index, self.breakdown)
        self.functions = FunctionIndex(self.index, self.breakdown, trace)
        self.claimed: set[str] = set()  # function names a specific rule already explained

    @property
    def tokens(self) -> int:
        return self.breakdown.tokens or self.metrics["output_tokens"] or 0

    @property
    def per_token_ms(self) -> float:
        return self.breakdown.per_token_ms

    @property
    def steps(self) -> list[StepCost]:
        return self.breakdown.steps

    def ms_per_token(self, ns: float) -> float:
        return ns / self.tokens / 1e6 if self.tokens else 0.0

    def has_device_timing(self) -> bool:
        return any(s.device_start_ns is not None for s in self.trace.spans)

    def function_evidence(self, calls: list[Call], top: int = 5) -> dict:
        """Evidence for a finding about `calls`: the functions, their time, example steps."""
        stats = self.functions.stats(calls)
        return {
            "functions": [{"name": f.name, "stage": f.stage, "ms_per_token": round(self.ms_per_token(f.total_ns), 4),
                           "ms_per_call": round(f.total_ns / f.count / 1e6, 4), "count": f.count,
                           "sources": f.sources} for f in stats[:top]],
            "steps_affected": len({c.step for c in calls}),
            "example_steps": sorted({c.step for c in calls})[:EXAMPLE_STEPS],
        }

    def claim(self, names) -> None:
        self.claimed.update(names)

    def suggestion(self, id: str, title: str, stage: str, evidence: dict, saving_ms: float, fix: str) -> Suggestion:
        per_token = self.per_token_ms
        saving_ms = max(0.0, min(saving_ms, per_token))
        speedup = round(per_token / (per_token - saving_ms), 3) if per_token > saving_ms else None
        return Suggestion(id, title, stage, evidence, round(saving_ms, 4), speedup, fix)

    def saving_if_batched(self, steps: list[StepCost], targets: list[int]) -> float:
        """ms/token saved if each step had produced `targets[i]` tokens in the same wall time
        (decode is memory-bound: a bigger batch costs little more per step)."""
        wall = sum(s.wall_ns for s in steps)
        now, then = sum(s.tokens for s in steps), sum(max(t, s.tokens) for s, t in zip(steps, targets))
        return self.ms_per_token(wall - wall * now / then) if then else 0.0

    def counter_before(self, name: str, sc: StepCost) -> float | None:
        """The counter's last value when step `sc` started: what its scheduler saw (the master
        records its counters after each step)."""
        return self.index.counter_at(name, sc.root.start_ns)
