"""Which functions a stage spends its time in: nested spans, foreign function events
(viztracer's complete events) and stack samples (in-process sampler, py-spy) that lie
inside the steps' critical-path stage spans, as `Call`s a rule can select and sum.

Stack samples count wherever they fall in a step: inside a stage span (that stage), in
the root's own thread outside every stage span (`gap`: unannotated code), and in a peer
thread's work that stood for a blocking receive (the receive's stage). A sample stands
for the time between its neighbours (half the interval on each side), not clipped to
the span it falls in: clipping made a sample in a span shorter than the interval count
for the span's length, and estimates came out low by interval / span length. But the
samples of one place (a thread's spans of one stage and name, or its time outside them)
never stand for more than that place's time: an in-process sampler gets the GIL where
the program lets go of it (a sleep, a wait), so its samples crowd there; unchecked, a
stage's functions added up to ten times the stage."""

from __future__ import annotations

import bisect
import functools
import os
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from ..frame_labels import frame_file, frame_name, is_idle_sample, is_user_code, source_line
from ..names import A_CALLER
from ..timeline import Sample, Span, Trace
from .breakdown import GAP, MODEL_STAGES, Breakdown, StepCost, is_host_side
from .index import TraceIndex
from .log_only import LOG_CALL_TEXT, log_only_lines
from .stats import union_ns

EXAMPLE_STEPS = 5
K = TypeVar("K", bound=Hashable)
Thread = tuple[int, int]  # (pid, tid)
Site = tuple[str, str]  # (stage, span name): where a thread's samples fell
SampleCell = tuple[Sample, int, int]  # a sample and the [start, end) it stands for
SamplesByThread = dict[Thread, tuple[list[int], list[SampleCell]]]  # ([ts...], cells in ts order)
SiteSample = tuple[int, Sample, int, int, "Span | None"]  # (step, sample, start, end, the stage span it lies in)
ForeignRow = tuple[int, int, str, str]  # (start, end, name, source) of a foreign complete event
ForeignByThread = dict[Thread, tuple[list[int], list[ForeignRow]]]


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
    sample: Sample | None = None  # the stack sample it comes from (its stack, its time)
    within: Span | None = None  # the stage span a sample lies in
    idle: bool = False  # a sample of a thread blocked in a wait (is_idle_sample)


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
    for (_, step), group in _group(calls, lambda c: (c.pid, c.step)).items():
        per_step[step] += union_ns((c.start, c.end) for c in group)
    return sum(per_step.values()), dict(per_step)


def main_stage(calls: list[Call]) -> str:
    """The stage in which `calls` take the most time."""
    by_stage = _group(calls, lambda c: c.stage)
    return str(max(by_stage, key=lambda st: covered(by_stage[st])[0]))


def _group(items: Iterable[Call], key: Callable[[Call], K]) -> dict[K, list[Call]]:
    out: dict[K, list[Call]] = defaultdict(list)
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
        self._samples = samples = _samples_by_thread(trace.samples)
        self._main = _main_files(trace)
        self._sampled_by_pid: dict[int, list[tuple[int, int, Call]]] | None = None
        sampled: dict[Thread, dict[Site, list[SiteSample]]] = defaultdict(lambda: defaultdict(list))
        site_ns: dict[Thread, dict[Site, int]] = defaultdict(lambda: defaultdict(int))  # the sites' time
        for sc in breakdown.steps:
            root = sc.root
            for stage, s in sc.stage_spans:
                # its part in the step (a span open across steps, an asyncio task's, counts once)
                lo, hi = max(s.start_ns, root.start_ns), min(s.end_ns, root.end_ns)
                if hi <= lo:
                    continue
                self._nested(index, stage, s, sc.step, lo, hi)
                self._foreign(foreign, stage, s, sc.step, lo, hi)
                site_ns[(s.pid, s.tid)][(stage, s.name)] += hi - lo
                for smp, a, b in _inside(samples, s.pid, s.tid, lo, hi):
                    sampled[(s.pid, s.tid)][(stage, s.name)].append((sc.step, smp, a, b, s))
            windows = [(root.pid, root.tid, root.start_ns, root.end_ns, GAP)] + sc.peer_windows
            for pid, tid, lo, hi, label in windows:
                union = _stage_union(sc, pid, tid)
                site_ns[(pid, tid)][(label, label)] += hi - lo - _overlap_ns(union, lo, hi)
                for smp, a, b in _outside(samples, union, pid, tid, lo, hi):
                    sampled[(pid, tid)][(label, label)].append((sc.step, smp, a, b, None))
        for thread, by_site in sampled.items():
            self._sampled(by_site, site_ns[thread])

    def _sampled(self, by_site: dict[Site, list[SiteSample]], site_ns: dict[Site, int]) -> None:
        """One thread's samples, by (stage, span name): spans of one name open at one place
        in the code. Frames (nearly) every sample of such a span has that also run other spans (the
        step loop, the function that opens the span) are not the stage's functions; with
        one span name only, its common frames are dropped. A site's samples shrink about
        their times to stand for at most the site's `site_ns` together."""
        names = {
            site: [_sampled_names(smp.stack, self._main.get(smp.pid, "")) for _, smp, _, _, _ in rows]
            for site, rows in by_site.items()
        }
        present = {site: {f for stack in stacks for f in enumerate(stack)} for site, stacks in names.items()}
        for site, rows in by_site.items():
            stage = site[0]
            enclosing = _always(names[site])
            if len(by_site) > 1:
                enclosing &= set().union(*(p for st, p in present.items() if st != site))
            scale = min(1.0, site_ns[site] / max(1, sum(b - a for _, _, a, b, _ in rows)))
            for (step, smp, a, b, within), stack in zip(rows, names[site]):
                if scale < 1.0:
                    a, b = smp.ts_ns - int((smp.ts_ns - a) * scale), smp.ts_ns + int((b - smp.ts_ns) * scale)
                idle = is_idle_sample(smp.stack, self._main.get(smp.pid, ""))
                for d, name in enumerate(stack):
                    if (d, name) not in enclosing:
                        self.calls.append(
                            Call(
                                stage,
                                step,
                                smp.pid,
                                a,
                                b,
                                name,
                                f"samples:{smp.source}",
                                stage not in MODEL_STAGES,
                                sample=smp,
                                within=within,
                                idle=idle,
                            )
                        )

    def _nested(self, index: TraceIndex, stage: str, s: Span, step: int, lo: int, hi: int) -> None:
        """`s`'s descendants, their part in [lo, hi)."""
        model = stage in MODEL_STAGES
        for d in index.descendants(s):
            a, b = max(d.start_ns, lo), min(d.end_ns, hi)
            if b > a:
                host = not model or is_host_side(d, stage)
                self.calls.append(Call(stage, step, d.pid, a, b, d.name, "span", host, d))

    def _foreign(self, foreign: ForeignByThread, stage: str, s: Span, step: int, lo: int, hi: int) -> None:
        """The foreign complete events inside [lo, hi) on `s`'s thread."""
        evs = foreign.get((s.pid, s.tid))
        if not evs:
            return
        starts, rows = evs
        i = bisect.bisect_left(starts, lo)
        while i < len(starts) and starts[i] < hi:
            start, end, name, source = rows[i]
            if end <= hi:
                self.calls.append(Call(stage, step, s.pid, start, end, name, source, stage not in MODEL_STAGES))
            i += 1

    def samples_in(self, c: Call) -> list[SampleCell]:
        """The stack samples (with their cells) a call holds: its own, or those inside its span."""
        if c.sample is not None:
            return [(c.sample, c.start, c.end)]
        if c.span is None:
            return []
        return _inside(self._samples, c.span.pid, c.span.tid, c.start, c.end)

    def sampled_ns(self, pid: int, tid: int, lo: int, hi: int, idle: bool) -> int:
        """How much of [lo, hi) one thread's stack samples show it blocked in a wait
        (`idle`: `is_idle_sample`, a thread pool's worker back at its queue, a select), or
        not (working, or waiting for the GIL)."""
        main = self._main.get(pid, "")
        return sum(
            max(0, min(b, hi) - max(a, lo))
            for smp, a, b in _inside(self._samples, pid, tid, lo, hi)
            if is_idle_sample(smp.stack, main) == idle
        )

    def samples_pids(self) -> set[int]:
        """The processes that have stack samples."""
        return {pid for pid, _ in self._samples}

    def sampled_in(self, c: Call) -> list[Call]:
        """The sampled calls whose sample lies inside call `c`'s span (same process)."""
        if c.span is None:
            return []
        if self._sampled_by_pid is None:
            by_pid: dict[int, list[tuple[int, int, Call]]] = defaultdict(list)  # (ts, tid, call)
            for x in self.calls:
                if x.sample is not None:
                    by_pid[x.pid].append((x.sample.ts_ns, x.sample.tid, x))
            self._sampled_by_pid = {pid: sorted(rows, key=lambda r: r[0]) for pid, rows in by_pid.items()}
        rows = self._sampled_by_pid.get(c.pid, [])
        lo = bisect.bisect_left(rows, c.start, key=lambda r: r[0])
        hi = bisect.bisect_left(rows, c.end, key=lambda r: r[0])
        return [x for _, tid, x in rows[lo:hi] if tid == c.span.tid]

    def responsible(self, calls: list[Call]) -> list[tuple[str, int]]:
        """The program's own functions behind `calls` (the innermost frame of each sample
        they hold that is the program's code, not a library's), with their sampled ns."""
        per: dict[str, int] = defaultdict(int)
        seen: set[int] = set()
        for c in calls:
            named = c.span if c.span is not None else c.within
            by = named.attrs.get(A_CALLER) if named is not None else None
            if isinstance(by, str) and is_user_code(by):  # an instrumented call names its caller (also for
                if c.sample is None or id(c.sample) not in seen:  # the samples inside it: an await's
                    per[by] += c.end - c.start  # stack shows only the event loop)
                    if c.sample is not None:
                        seen.add(id(c.sample))
                continue
            for smp, a, b in self.samples_in(c):
                if id(smp) not in seen:
                    seen.add(id(smp))
                    owner = _owner(smp, self._main.get(smp.pid, ""))
                    if owner is not None:
                        per[owner] += b - a
        return sorted(per.items(), key=lambda kv: -kv[1])

    def select(
        self, pattern: re.Pattern[str] | None = None, stage: str | None = None, host_side: bool | None = None
    ) -> list[Call]:
        calls = [
            c
            for c in self.calls
            if (stage is None or c.stage == stage) and (host_side is None or c.host_side == host_side)
        ]
        if pattern is None:
            return calls
        match = {n for n in {c.name for c in calls} if pattern.search(n)}  # once per distinct name
        return [c for c in calls if c.name in match]

    def stats(self, calls: list[Call]) -> list[FunctionStat]:
        """Per (stage, name) totals of `calls`, largest first."""
        out = []
        for (stage, name), group in _group(calls, lambda c: (c.stage, c.name)).items():
            total, per_step = covered(group)
            out.append(
                FunctionStat(name, stage, total, len(group), sorted(per_step), sorted({c.source for c in group}))
            )
        return sorted(out, key=lambda f: -f.total_ns)


def _owner(smp: Sample, main_file: str) -> str | None:
    """The program's own code a sample is in: its innermost frame that is not a library's
    ('mod.func:LINE' when the sampler recorded the line)."""
    return next((n for n in reversed(_sampled_names(smp.stack, main_file)) if is_user_code(n)), None)


def _main_files(trace: Trace) -> dict[int, str]:
    """pid -> the file of that process's __main__ (its argv[0], from its spool header)."""
    out = {}
    for pid, p in trace.processes.items():
        argv, cwd = p.header.get("argv") or [], p.header.get("cwd") or ""
        if argv and argv[0].endswith(".py"):
            out[pid] = os.path.join(cwd, argv[0])
    return out


@functools.lru_cache(maxsize=1 << 14)
def _sampled_names(stack: tuple[str, ...], main_file: str = "") -> tuple[str, ...]:
    """The functions of a sampled stack, plus, for the innermost frame and for the
    innermost frame of the program's own code, the line ('mod.func:LINE': a finding names
    the line of an unannotated function) and the call on that line ('numpy.concatenate':
    a C call has no frame of its own; 'logging.Logger.debug': a log call's arguments are
    formatted on its line, whichever library does the formatting)."""
    stack = tuple(f for f in stack if not f.startswith("llmtrace."))  # instrumentation wrappers
    names = tuple(frame_name(f) for f in stack)
    if not stack:
        return names
    extra: list[str] = []
    user = next((i for i in range(len(stack) - 1, -1, -1) if is_user_code(names[i])), None)
    for i in dict.fromkeys(j for j in (len(stack) - 1, user) if j is not None):
        line = stack[i].rsplit(":", 1)
        if len(line) == 2 and line[1].isdigit():
            extra.append(f"{names[i]}:{line[1]}")
        callee = line_callee(stack[i], main_file)
        if callee and callee not in extra:
            extra.append(callee)
    return names + tuple(extra)


_CALL = re.compile(r"\b((?:np|numpy|torch|pd|pandas|json|pickle|copy|gc)(?:\.\w+)+)\s*\(")
_ALIASES = {"np": "numpy", "pd": "pandas"}


@functools.lru_cache(maxsize=1 << 14)
def line_callee(frame: str, main_file: str = "") -> str | None:
    """The library call on a sampled leaf frame's source line ('module:func:LINE'), e.g.
    'numpy.concatenate': a C function has no Python frame of its own, so a sample taken
    inside np.concatenate shows only the line that calls it. `main_file`: the sampled
    process's __main__ (not this one's)."""
    path, line = frame_file(frame, main_file)
    level = log_only_lines(path).get(line) if path and is_user_code(frame_name(frame)) else None
    if level:  # the program's line only computes or formats what a log call prints
        return f"logging.Logger.{level}"
    text = source_line(frame, main_file)
    log_call = LOG_CALL_TEXT.search(text)  # a line of a library, or of a file that does not parse
    if log_call:
        return f"logging.Logger.{log_call.group(1)}"
    m = _CALL.search(text)
    if not m:
        return None
    root, _, rest = m.group(1).partition(".")
    return f"{_ALIASES.get(root, root)}.{rest}"


def _always(stacks: list[tuple[str, ...]]) -> set[tuple[int, str]]:
    """(depth, function) pairs present in all stacks but the few a sampler cut short (py-spy
    unwinds only the innermost frames of about 2 in 100 samples; one such sample kept the
    module's own frame among a stage's top functions)."""
    seen = Counter(pair for st in stacks for pair in set(enumerate(st)))
    return {pair for pair, n in seen.items() if n >= ENCLOSING_SHARE * len(stacks)}


ENCLOSING_SHARE = 0.95  # of a site's samples a frame is in to be the code around the site, not its work
PACE_BLOCK = 32  # gaps per block whose median is the sampler's local pace


def _samples_by_thread(samples: Iterable[Sample]) -> SamplesByThread:
    """{(pid, tid): ([ts...], [(sample, start, end)...])}: each sample stands for the time from
    halfway to the previous sample of its thread to halfway to the next (irregular ticks,
    e.g. a loaded machine, stay unbiased), but never more than the sampler's local pace on
    a side (the median gap of its block of PACE_BLOCK gaps: the sampler slows down when its
    ticks cost more, and its wake-ups jitter by up to a gap): a sample next to a long pause
    in sampling (samples taken only in some spans, a call that held the GIL) does not stand
    for the pause."""
    rows: dict[Thread, list[Sample]] = defaultdict(list)
    for smp in samples:
        rows[(smp.pid, smp.tid)].append(smp)
    out: SamplesByThread = {}
    for key, lst in rows.items():
        lst.sort(key=lambda x: x.ts_ns)
        ts = [x.ts_ns for x in lst]
        gaps = [b - a for a, b in zip(ts, ts[1:])]
        pace = [
            sorted(block)[len(block) // 2]
            for block in (gaps[i : i + PACE_BLOCK] for i in range(0, len(gaps), PACE_BLOCK))
        ] or [0]
        cells = []
        for i, x in enumerate(lst):
            half = pace[min(i, len(gaps) - 1) // PACE_BLOCK] if gaps else 0
            before = min(half, gaps[i - 1] // 2) if i else half
            after = min(half, gaps[i] // 2) if i < len(gaps) else half
            cells.append((x, ts[i] - before, ts[i] + after))
        out[key] = (ts, cells)
    return out


def _inside(by_thread: SamplesByThread, pid: int, tid: int, start: int, end: int) -> list[SampleCell]:
    rows = by_thread.get((pid, tid))
    if not rows:
        return []
    lo, hi = bisect.bisect_left(rows[0], start), bisect.bisect_left(rows[0], end)
    return rows[1][lo:hi]


def _stage_union(sc: StepCost, pid: int, tid: int) -> list[list[int]]:
    """The step's stage spans on one thread, and its wait for a remote step (the time the
    breakdown gives the transport, not `gap`), as sorted disjoint [start, end] intervals."""
    spans = [s for _, s in sc.stage_spans] + ([sc.wait] if sc.wait is not None else [])
    union: list[list[int]] = []
    for a, b in sorted((s.start_ns, s.end_ns) for s in spans if s.pid == pid and s.tid == tid):
        if union and a <= union[-1][1]:
            union[-1][1] = max(union[-1][1], b)
        else:
            union.append([a, b])
    return union


def _overlap_ns(union: list[list[int]], start: int, end: int) -> int:
    return sum(max(0, min(b, end) - max(a, start)) for a, b in union)


def _outside(
    by_thread: SamplesByThread, union: list[list[int]], pid: int, tid: int, start: int, end: int
) -> list[SampleCell]:
    """Samples of one thread in [start, end) that lie in none of the intervals of `union`."""
    starts = [a for a, _ in union]
    out = []
    for row in _inside(by_thread, pid, tid, start, end):
        i = bisect.bisect_right(starts, row[0].ts_ns) - 1
        if i < 0 or row[0].ts_ns >= union[i][1]:
            out.append(row)
    return out


def _foreign_by_thread(events: list[dict[str, Any]]) -> ForeignByThread:
    """{(pid, tid): ([start_ns...], [(start, end, name, source)...])} of complete events."""
    rows: dict[Thread, list[ForeignRow]] = defaultdict(list)
    for ev in events:
        if ev.get("ph") != "X" or "dur" not in ev:
            continue
        start = int(float(ev["ts"]) * 1000)
        rows[(int(ev.get("pid", 0)), int(ev.get("tid", 0)))].append(
            (start, start + int(float(ev["dur"]) * 1000), str(ev.get("name", "?")), str(ev.get("cat") or "foreign"))
        )
    out: ForeignByThread = {}
    for key, lst in rows.items():
        lst.sort()
        out[key] = ([r[0] for r in lst], lst)
    return out


def program_functions(trace: Trace, top: int = 8) -> list[tuple[str, int]]:
    """Over the whole run (no steps needed): the program's own functions the threads were
    busy in (the innermost frame of its code in each sample, with the line; samples that
    wait are left out), with their sampled ns, largest first."""
    main = _main_files(trace)
    per: dict[str, int] = defaultdict(int)
    for (pid, _), (_, cells) in _samples_by_thread(trace.samples).items():
        for smp, a, b in cells:
            if not smp.stack or is_idle_sample(smp.stack, main.get(pid, "")):
                continue
            owner = _owner(smp, main.get(pid, ""))
            if owner is not None:
                per[owner] += b - a
    return sorted(per.items(), key=lambda kv: -kv[1])[:top]
