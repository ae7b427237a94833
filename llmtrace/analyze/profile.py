"""Which spans of a trace play which part in its serving loop: the pipeline profile.

A pipeline declares its profile (the engine does, in its process resource
`llmtrace.profile`: `{"roots": [...], "waits": [...], "remote_roots": [...]}`), or the
analyzer infers one, in this order:
  1. `step` spans (`llmtrace.step()` / `llmtrace.steps()`): each is a step;
  2. spans carrying step ids: per step id, its longest top-level span;
  3. a repeated span that holds about one model-stage span each (not an HTTP handler
     that holds a whole request's decode loop);
  4. the cadence of the model stage: on each thread that runs `forward`, one step from
     the start of one outermost forward to the start of the next (its tail: the spans
     that follow the last one); threads of one process that take turns at forwards (a
     pool the loop hands each step to) are one sequence, each window on its forward's
     thread, and the next forward's thread's work before it is on the window's path.
     A window longer than IDLE_FACTOR times the thread's median held an idle wait for
     new work and is left out (counted in the profile).
Steps of kind 4 are synthetic root spans (named `step`, stage `step`) whose children are
the thread's top-level spans in the window, less those of other asyncio tasks: a span
that overlaps a forward it does not enclose (a forward runs no other task; a handler
awaiting its result, or a server's periodic `asyncio.sleep`, is open across it).
Tokens per step: the root's `tokens`/`batch` attrs, else the batch of its forward
(auto-instrumentation records it), else one.
"""

from __future__ import annotations

import statistics
from bisect import bisect_left, bisect_right
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from .. import names
from ..timeline import Span
from .index import TraceIndex

IDLE_FACTOR = 3.0  # a cadence window this many medians long held an idle wait
ONE_MODEL_SPAN = 1.5  # a repeated span holding more model spans than this on average is no step
_SYNTHETIC_ID = 1 << 62


@dataclass(frozen=True)
class Profile:
    roots: tuple[str, ...] = ()  # step root span names (empty: by step ids or inferred)
    waits: tuple[str, ...] = ()  # spans in a root that wait for a remote root (the engine's agent.wait)
    remote_roots: tuple[str, ...] = ()  # the remote step spans that stand for a wait (agent.step)
    model_stages: tuple[str, ...] = names.MODEL_STAGES
    source: str = "declared"  # declared | step-spans | step-ids | repeated-span | model-cadence | none

    @classmethod
    def from_resource(cls, d: dict[str, Any]) -> Profile:
        return cls(
            tuple(d.get("roots", ())),
            tuple(d.get("waits", ())),
            tuple(d.get("remote_roots", ())),
            tuple(d.get("model_stages", names.MODEL_STAGES)),
        )

    def to_resource(self) -> dict[str, list[str]]:
        return {
            "roots": list(self.roots),
            "waits": list(self.waits),
            "remote_roots": list(self.remote_roots),
            "model_stages": list(self.model_stages),
        }


@dataclass
class Steps:
    """The step roots the breakdown walks, and how they were found."""

    profile: Profile
    roots: list[tuple[int, Span]] = field(default_factory=list)
    idle_windows: int = 0  # cadence windows left out for holding idle time
    note: str = ""  # said in the report when the steps were inferred
    # root span id -> (pid, tid, lo, hi): in a pool's sequence, the thread that runs the next
    # forward; its work in [lo, hi) before that forward is on this step's critical path
    handoffs: dict[int, tuple[int, int, int, int]] = field(default_factory=dict)


def declared(index: TraceIndex) -> Profile | None:
    for p in index.trace.processes.values():
        d = p.resource.get(names.R_PROFILE)
        if isinstance(d, dict) and d.get("roots"):
            return Profile.from_resource(d)
    return None


def find_steps(index: TraceIndex) -> Steps:
    """The step roots; a root still open when its process stopped (cut short) is no step."""
    steps = _find_steps(index)
    steps.roots = [(n, r) for n, r in steps.roots if not r.open_at_stop]
    return steps


def _find_steps(index: TraceIndex) -> Steps:
    profile = declared(index)
    if profile is not None:
        roots = _longest_per_step([s for n in profile.roots for s in index.by_name.get(n, ()) if s.step >= 0])
        if roots:  # a declared profile whose roots were not recorded: infer as for anyone else
            return Steps(profile, roots)
    marked = [s for s in index.by_name.get(names.STEP, ()) if s.step >= 0 and s.stage == names.STEP]
    if marked:
        return Steps(Profile(source="step-spans"), _longest_per_step(marked))
    with_ids = [s for s in index.trace.spans if s.step >= 0 and index.is_root(s)]
    if with_ids:
        return Steps(Profile(source="step-ids"), _longest_per_step(with_ids))
    repeated = _repeated_roots(index)
    if repeated:
        return Steps(
            Profile(source="repeated-span"),
            repeated,
            note=f"steps inferred: each `{repeated[0][1].name}` span is one step (no step ids recorded)",
        )
    return _model_cadence(index)


def _longest_per_step(cand: list[Span]) -> list[tuple[int, Span]]:
    best: dict[int, Span] = {}
    for s in cand:
        cur = best.get(s.step)
        if cur is None or s.dur_ns > cur.dur_ns:
            best[s.step] = s
    return sorted(best.items(), key=lambda kv: kv[1].start_ns)


def _model_spans(index: TraceIndex, under: Span) -> int:
    return sum(1 for d in index.descendants(under) if d.stage in names.MODEL_STAGES)


def _repeated_roots(index: TraceIndex) -> list[tuple[int, Span]]:
    """Top-level spans of the most repeated name in one process (one loop's: a front's and
    its worker's queue reads are not one sequence) that hold about one model span each."""
    by_name: dict[tuple[str, int], list[Span]] = defaultdict(list)
    for s in index.trace.spans:
        if index.is_root(s) and s.stage not in names.MODEL_STAGES and index.children.get(s.span_id):
            by_name[(s.name, s.pid)].append(s)
    for key in sorted(by_name, key=lambda k: -len(by_name[k])):
        spans = by_name[key]
        if len(spans) < 2:
            break
        model = sum(_model_spans(index, s) for s in spans)
        if 0 < model <= ONE_MODEL_SPAN * len(spans) or (model == 0 and not index.by_stage.get(names.FORWARD)):
            return list(enumerate(spans))
    return []


def _outermost_forwards(index: TraceIndex) -> dict[tuple[int, int], list[Span]]:
    by_thread: dict[tuple[int, int], list[Span]] = defaultdict(list)
    for s in index.by_stage.get(names.FORWARD, ()):
        if not any(a.stage == names.FORWARD for a in index.ancestors(s.parent_id)):
            by_thread[(s.pid, s.tid)].append(s)
    return by_thread


def _lanes(threads: dict[tuple[int, int], list[Span]]) -> list[list[Span]]:
    """The forward sequences that are one step loop each: a thread's, or a process's when
    its forwards run on several threads that take turns (a thread pool the loop hands each
    step to: `run_in_executor`), which per thread would give windows overlapping in time."""
    by_pid: dict[int, list[list[Span]]] = defaultdict(list)
    for (pid, _), fwds in threads.items():
        by_pid[pid].append(fwds)
    lanes = []
    for groups in by_pid.values():
        merged = sorted((f for g in groups for f in g), key=lambda f: f.start_ns)
        if len(groups) > 1 and all(a.end_ns <= b.start_ns for a, b in zip(merged, merged[1:])):
            lanes.append(merged)
        else:
            lanes.extend(groups)
    return lanes


def _model_cadence(index: TraceIndex) -> Steps:
    lanes = [fwds for fwds in _lanes(_outermost_forwards(index)) if len(fwds) >= 2]
    steps = Steps(Profile(source="model-cadence"))
    if not lanes:
        steps.profile = Profile(source="none")
        return steps
    windows = []
    for fwds in lanes:
        tops = {
            (pid, tid): _own_task(index, index.top_level(pid, tid), [f for f in fwds if f.tid == tid])
            for pid, tid in {(f.pid, f.tid) for f in fwds}
        }
        starts = [f.start_ns for f in fwds]
        last = tops[(fwds[-1].pid, fwds[-1].tid)]
        tail_end = max((s.end_ns for s in last if s.start_ns >= starts[-1]), default=fwds[-1].end_ns)
        bounds = list(zip(starts, starts[1:] + [tail_end]))
        usual = statistics.median(b - a for a, b in bounds[:-1])
        for f, nxt, (a, b) in zip(fwds, fwds[1:] + [None], bounds):
            if b - a > IDLE_FACTOR * usual:
                steps.idle_windows += 1
                continue
            handoff = (nxt.pid, nxt.tid, max(a, f.end_ns), b) if nxt is not None and nxt.tid != f.tid else None
            windows.append((a, b, f.pid, f.tid, index.in_window(tops[(f.pid, f.tid)], a, b, around=f), handoff))
    windows.sort(key=lambda w: w[0])
    for n, (a, b, pid, tid, children, handoff) in enumerate(windows):
        root = Span(names.STEP, names.STEP, pid, tid, a, b, _SYNTHETIC_ID | n, step=n, attrs=_window_tokens(children))
        index.add_synthetic(root, children)
        steps.roots.append((n, root))
        if handoff is not None:
            steps.handoffs[root.span_id] = handoff
    steps.note = (
        "steps inferred from the model's cadence: one per outermost `forward` on its thread "
        "(mark the loop with `llmtrace.steps(...)` to say where a step starts)"
    ) + _inferred_model(lanes)
    if steps.idle_windows:
        n = steps.idle_windows
        steps.note += f"; {n} window{'s' if n != 1 else ''} holding idle waits left out"
    return steps


def _inferred_model(lanes: list[list[Span]]) -> str:
    """What the report says of a model call llmtrace chose itself (auto/hot_loop.py)."""
    for fwds in lanes:
        f = fwds[-1]
        how = f.attrs.get(names.A_INFERRED)
        if how:
            return (
                f"; the model is `{f.attrs.get(names.A_FUNCTION)}`, {how}, timed from the moment it was "
                "found (the steps before are not in the breakdown)"
            )
    return ""


def _own_task(index: TraceIndex, top: list[Span], fwds: list[Span]) -> list[Span]:
    """`top` less the spans of other asyncio tasks: those overlapping a forward of `fwds`
    (by start) that is not inside them."""
    holders: set[int] = set()
    for f in fwds:
        for a in index.ancestors(f.parent_id):
            if a.span_id in holders:  # and its parents: another forward's
                break
            holders.add(a.span_id)
    starts = [f.start_ns for f in fwds]
    out = []
    for s in top:
        i = max(0, bisect_right(starts, s.start_ns) - 1)
        crosses = any(f.end_ns > s.start_ns for f in fwds[i : bisect_left(starts, s.end_ns)])
        if not crosses or s.span_id in holders or any(f is s for f in fwds):
            out.append(s)
    return out


def _window_tokens(children: list[Span]) -> dict[str, int]:
    """A synthetic step's tokens: its forward's batch (one token per sequence)."""
    for s in children:
        if s.stage == names.FORWARD:
            b = s.attrs.get(names.A_BATCH)
            if isinstance(b, int) and b > 0:
                return {names.A_BATCH: b}
    return {}
