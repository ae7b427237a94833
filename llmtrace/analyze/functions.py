"""Which functions a stage spends its time in: nested spans, foreign function events
(viztracer's complete events) and stack samples (in-process sampler, py-spy) that lie
inside the steps' critical-path stage spans, as `Call`s a rule can select and sum."""
from __future__ import annotations

import bisect
import functools
import importlib.util
import linecache
import re
import sys
from collections import defaultdict
from dataclasses import dataclass

from ..timeline import Span, Trace
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


def main_stage(calls: list[Call]) -> str:
    """The stage in which `calls` take the most time."""
    by_stage = _group(calls, lambda c: c.stage)
    return max(by_stage, key=lambda st: covered(by_stage[st])[0])


def _group(items, key) -> dict:
    out = defaultdict(list)
    for it in items:
        out[key(it)].append(it)
    return out


class FunctionIndex:
    """Which functions dominate stage X: nested spans, foreign complete events ('X', e.g.
    viztracer) and stack samples (in-process sampler, py-spy) that lie inside the stage's
    critical-path spans (same pid and thread). A sample stands for its share of the
    sampling interval, for each of its frames that belongs to the stage."""

    def __init__(self, index: TraceIndex, breakdown: Breakdown, trace: Trace):
        self.calls: list[Call] = []
        foreign = _foreign_by_thread(trace.foreign_events)
        samples = _samples_by_thread(trace.samples)
        sampled: dict[tuple, dict[str, list[tuple]]] = defaultdict(lambda: defaultdict(list))
        for sc in breakdown.steps:
            for stage, s in sc.stage_spans:
                self._nested(index, stage, s, sc.step)
                self._foreign(foreign, stage, s, sc.step)
                for smp, a, b in _inside(samples, s):  # clipped to the stage span
                    sampled[(s.pid, s.tid)][(stage, s.name)].append(
                        (sc.step, smp, max(a, s.start_ns), min(b, s.end_ns)))
        for by_stage in sampled.values():
            self._sampled(by_stage)

    def _sampled(self, by_site: dict[tuple[str, str], list[tuple]]) -> None:
        """One thread's samples, by (stage, span name): spans of one name open at one place
        in the code. Frames every sample of such a span has that also run other spans (the
        step loop, the function that opens the span) are not the stage's functions; with
        one span name only, its common frames are dropped."""
        names = {site: [_sampled_names(smp.stack) for _, smp, _, _ in rows] for site, rows in by_site.items()}
        present = {site: {f for stack in stacks for f in enumerate(stack)} for site, stacks in names.items()}
        for site, rows in by_site.items():
            stage = site[0]
            enclosing = _always(names[site])
            if len(by_site) > 1:
                enclosing &= set().union(*(p for st, p in present.items() if st != site))
            for (step, smp, a, b), stack in zip(rows, names[site]):
                for d, name in enumerate(stack):
                    if (d, name) not in enclosing:
                        self.calls.append(Call(stage, step, smp.pid, a, b, name, f"samples:{smp.source}",
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
        calls = [c for c in self.calls if (stage is None or c.stage == stage)
                 and (host_side is None or c.host_side == host_side)]
        if pattern is None:
            return calls
        match = {n for n in {c.name for c in calls} if pattern.search(n)}  # once per distinct name
        return [c for c in calls if c.name in match]

    def stats(self, calls: list[Call]) -> list[FunctionStat]:
        """Per (stage, name) totals of `calls`, largest first."""
        out = []
        for (stage, name), group in _group(calls, lambda c: (c.stage, c.name)).items():
            total, per_step = covered(group)
            out.append(FunctionStat(name, stage, total, len(group), sorted(per_step),
                                    sorted({c.source for c in group})))
        return sorted(out, key=lambda f: -f.total_ns)


@functools.lru_cache(maxsize=1 << 16)
def frame_name(frame: str) -> str:
    """'module:Class.func:123' (sampler label) -> 'module.Class.func'."""
    parts = frame.split(":")
    if len(parts) > 1 and parts[-1].isdigit():
        parts.pop()
    return ".".join(parts)


def _sampled_names(stack: tuple[str, ...]) -> tuple[str, ...]:
    names = tuple(frame_name(f) for f in stack)
    callee = line_callee(stack[-1]) if stack else None
    return names + (callee,) if callee else names


_CALL = re.compile(r"\b((?:np|numpy|torch|pd|pandas|json|pickle|copy|gc)(?:\.\w+)+)\s*\(")
_ALIASES = {"np": "numpy", "pd": "pandas"}


@functools.lru_cache(maxsize=1 << 14)
def line_callee(frame: str) -> str | None:
    """The library call on a sampled leaf frame's source line ('module:func:LINE'), e.g.
    'numpy.concatenate': a C function has no Python frame of its own, so a sample taken
    inside np.concatenate shows only the line that calls it."""
    parts = frame.split(":")
    if len(parts) < 3 or not parts[-1].isdigit():
        return None
    text = linecache.getline(_module_file(parts[0]), int(parts[-1]))
    m = _CALL.search(text)
    if not m:
        return None
    root, _, rest = m.group(1).partition(".")
    return f"{_ALIASES.get(root, root)}.{rest}"


@functools.lru_cache(maxsize=1 << 10)
def _module_file(module: str) -> str:
    mod = sys.modules.get(module)
    path = getattr(mod, "__file__", None)
    if path is None:
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            spec = None
        path = spec.origin if spec is not None and spec.origin else ""
    return path


def _always(stacks: list[tuple[str, ...]]) -> set[tuple[int, str]]:
    """(depth, function) pairs present in every stack."""
    out = set(enumerate(stacks[0])) if stacks else set()
    for st in stacks[1:]:
        out &= set(enumerate(st))
    return out


def _samples_by_thread(samples) -> dict:
    """{(pid, tid): ([ts...], [(sample, start, end)...])}: each sample stands for the time from
    halfway to the previous sample of its thread to halfway to the next (irregular ticks,
    e.g. a loaded machine, stay unbiased)."""
    rows = defaultdict(list)
    for smp in samples:
        rows[(smp.pid, smp.tid)].append(smp)
    out = {}
    for key, lst in rows.items():
        lst.sort(key=lambda x: x.ts_ns)
        ts = [x.ts_ns for x in lst]
        cells = []
        for i, x in enumerate(lst):
            before = (ts[i] - ts[i - 1]) // 2 if i else (ts[1] - ts[0]) // 2 if len(ts) > 1 else 0
            after = (ts[i + 1] - ts[i]) // 2 if i + 1 < len(ts) else before
            cells.append((x, ts[i] - before, ts[i] + after))
        out[key] = (ts, cells)
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
