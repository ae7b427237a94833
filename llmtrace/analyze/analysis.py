"""What a rule gets (`Analysis`): the trace, its indexes, the breakdown, the serving
metrics and the functions seen inside each stage; and the `Suggestion` a rule returns."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from .. import names
from ..timeline import Trace
from . import model_calls
from .breakdown import Breakdown, StepCost
from .cpu import ThreadCpu
from .device import device_activity
from .functions import EXAMPLE_STEPS, Call, FunctionIndex, covered
from .index import TraceIndex
from .metrics import serving_metrics
from .report_schema import Evidence, SuggestionEntry
from .stats import per_token_interval


@dataclass
class Suggestion:
    id: str
    title: str
    stage: str
    evidence: Evidence
    est_saving_ms_per_token: float
    est_speedup: float | None  # None when the saving is the whole per-token time
    fix: str
    impact: str | None = None  # what acting on it buys when that is not time (a true breakdown, memory)
    interval: tuple[float, float] | None = None  # 95% bootstrap interval of the saving over steps

    def to_dict(self) -> SuggestionEntry:
        return {
            "id": self.id,
            "title": self.title,
            "stage": self.stage,
            "evidence": self.evidence,
            "est_saving_ms_per_token": self.est_saving_ms_per_token,
            "est_speedup": self.est_speedup,
            "est_saving_interval": list(self.interval) if self.interval else None,
            "fix": self.fix,
            "impact": self.impact,
        }


def saving_cells(s: SuggestionEntry) -> tuple[str, str]:
    """(ms/token saved, speedup) as table cells; '-' where the finding saves no time."""
    if s["est_saving_ms_per_token"] <= 0:
        return "-", "-"
    ci = s.get("est_saving_interval")
    saves = f"{s['est_saving_ms_per_token']:.3f}" + (f" ({ci[0]:.3f}-{ci[1]:.3f})" if ci else "")
    return saves, f"{s['est_speedup']:.2f}x" if s["est_speedup"] else "-"


def saving_text(s: SuggestionEntry) -> str:
    """A suggestion's payoff in words: its time saving, else what `impact` says it buys."""
    if s["est_saving_ms_per_token"] <= 0:
        return "no time saved" + (f"; {s['impact']}" if s.get("impact") else "")
    speed = f", {s['est_speedup']:.2f}x" if s["est_speedup"] else ""
    ci = s.get("est_saving_interval")
    within = f" (95% over steps: {ci[0]:.3f}-{ci[1]:.3f})" if ci else ""
    return f"saves ~{s['est_saving_ms_per_token']:.3f} ms/token{within}{speed}"


MIN_STEPS_AFFECTED = 3  # a per-step pattern seen in fewer steps is a coincidence (another task's sleep)


class Analysis:
    def __init__(self, trace: Trace):
        self.trace = trace  # as recorded; the index's has model calls made of module calls grouped
        self.index = TraceIndex(model_calls.grouped(trace))
        self.breakdown = Breakdown.of(self.index)
        self.metrics = serving_metrics(self.index, self.breakdown)
        self.functions = FunctionIndex(self.index, self.breakdown, trace)
        self.claimed: set[str] = set()  # function names a specific rule already explained
        self.rule_errors: list[str] = []  # rules that failed on this trace (rules.run_rules)
        self._cpu: ThreadCpu | None = None
        self.device = device_activity(self.index, self.breakdown.profile.model_stages)

    @property
    def cpu(self) -> ThreadCpu:
        """Per-thread CPU time (cpu.py), read on first use."""
        if self._cpu is None:
            self._cpu = ThreadCpu(self.trace)
        return self._cpu

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

    def setting(self, knob: str, description: str) -> str:
        """How a fix names `knob` (names.K_*): the pipeline's own config key when it declared
        one (resource names.R_SETTINGS), else `description`: never another program's name."""
        for p in self.trace.processes.values():
            declared = p.resource.get(names.R_SETTINGS)
            if isinstance(declared, dict) and isinstance(declared.get(knob), str):
                return f"`{declared[knob]}`"
        return description

    def has_device_timing(self) -> bool:
        return any(s.device_start_ns is not None for s in self.trace.spans)

    def function_evidence(self, calls: list[Call], top: int = 5) -> Evidence:
        """Evidence for a finding about `calls`: the functions, their time, example steps."""
        stats = self.functions.stats(calls)
        return {
            "functions": [
                {
                    "name": f.name,
                    "stage": f.stage,
                    "ms_per_token": round(self.ms_per_token(f.total_ns), 4),
                    "ms_per_call": round(f.total_ns / f.count / 1e6, 4),
                    "count": f.count,
                    "sources": f.sources,
                }
                for f in stats[:top]
            ],
            # where the fix goes: the program's own functions (with the line when sampled innermost)
            "responsible": [
                {"function": name, "ms_per_token": round(self.ms_per_token(ns), 4)}
                for name, ns in self.functions.responsible(calls)[:3]
            ],
            "steps_affected": len({c.step for c in calls}),
            "example_steps": sorted({c.step for c in calls})[:EXAMPLE_STEPS],
        }

    def claim(self, names: Iterable[str]) -> None:
        self.claimed.update(names)

    def claim_calls(self, calls: Iterable[Call]) -> None:
        """Claim `calls` and the functions sampled inside their spans (a send's own frames
        are that send's cost, not a hot function of their own)."""
        self.claim(c.name for c in calls)
        self.claim(inner.name for c in calls for inner in self.functions.sampled_in(c))

    def explained(self) -> list[Call]:
        """Calls of the functions earlier rules claimed (their callees included by time)."""
        return [c for c in self.functions.calls if c.name in self.claimed]

    def unexplained(self, calls: list[Call]) -> tuple[list[Call], dict[int, int]]:
        """`calls` less what earlier findings explain: the calls not inside a claimed call
        (a torch.cat run by a tensor printer is the log finding's), and per step their time
        not overlapped by claimed calls."""
        claimed = self.explained()
        cells = {(c.pid, c.start, c.end) for c in claimed}
        left = [c for c in calls if c.name not in self.claimed and (c.pid, c.start, c.end) not in cells]
        before = covered(claimed)[1]
        return left, {
            step: ns - before.get(step, 0)
            for step, ns in covered(left + claimed)[1].items()
            if ns > before.get(step, 0)
        }

    def stage_calls(self, label: str) -> list[Call]:
        """The critical-path spans of breakdown row `label` themselves, as calls (an
        automatic `logging` span is a log call even when no sample landed in it)."""
        return [
            Call(label, sc.step, s.pid, s.start_ns, s.end_ns, s.name, "span", True, s)
            for sc in self.steps
            for st, s in sc.stage_spans
            if st == label
        ]

    def removable(
        self, pattern: re.Pattern[str], stage: str | None = None
    ) -> tuple[list[Call], float, Evidence, dict[int, int]] | None:
        """Host-side calls matching `pattern` (and the spans of breakdown row `stage`) whose
        whole time a fix removes (log calls, padding by concatenation), less what earlier
        findings explain: (calls, ms/token saved, evidence, their ns per step), the calls
        claimed."""
        found = self.functions.select(pattern, host_side=True) + (self.stage_calls(stage) if stage else [])
        calls, per_step = self.unexplained(found)
        if not calls or not per_step:
            return None
        evidence = self.function_evidence(calls)
        self.claim(c.name for c in calls)
        return calls, self.ms_per_token(sum(per_step.values())), evidence, per_step

    def stage_cost(self, label: str) -> tuple[float, list[int], Evidence] | None:
        """A breakdown row's time on the critical path: (ms/token, steps where it ran,
        evidence: the spans' count and the functions found inside them), None if absent."""
        steps = [sc for sc in self.steps if sc.parts.get(label)]
        if not steps:
            return None
        calls = self.stage_calls(label) + self.functions.select(stage=label)
        ev = self.function_evidence(calls)
        ev.update(
            spans=sum(sc.counts.get(label, 0) for sc in steps),
            steps_affected=len(steps),
            example_steps=[sc.step for sc in steps[:5]],
        )
        return self.breakdown.ms_per_token(label), [sc.step for sc in steps], ev

    def stage_suggestion(
        self, id: str, label: str, title: Callable[[float, list[int], Evidence], str], fix: str
    ) -> list[Suggestion]:
        """The finding of a rule whose fix removes a breakdown row's time (a sleep, a
        serialization): saving = the row's ms/token; title(ms, steps, evidence) says it."""
        found = self.stage_cost(label)
        if found is None or len(found[1]) < MIN_STEPS_AFFECTED:
            return []
        ms, steps, ev = found
        self.claim(f["name"] for f in ev["functions"])
        per_step = {sc.step: sc.parts.get(label, 0) for sc in self.steps}
        return [
            self.suggestion(
                id, title(ms, steps, ev), label, {**ev, "ms_per_token": round(ms, 4)}, ms, fix, per_step=per_step
            )
        ]

    def suggestion(
        self,
        id: str,
        title: str,
        stage: str,
        evidence: Evidence,
        saving_ms: float,
        fix: str,
        impact: str | None = None,
        per_step: Mapping[int, float] | None = None,
    ) -> Suggestion:
        """A finding; `per_step` (its cost in each step, any scale) gives the saving a 95%
        bootstrap interval over the steps."""
        per_token = self.per_token_ms
        saving_ms = max(0.0, min(saving_ms, per_token))
        speedup = round(per_token / (per_token - saving_ms), 3) if per_token > saving_ms else None
        return Suggestion(
            id,
            title,
            stage,
            evidence,
            round(saving_ms, 4),
            speedup,
            fix,
            impact,
            self._interval(saving_ms, per_step) if per_step else None,
        )

    def _interval(self, saving_ms: float, per_step: Mapping[int, float]) -> tuple[float, float] | None:
        """The saving's interval: its per-step costs scaled to add up to the saving."""
        total = sum(per_step.get(sc.step, 0) for sc in self.steps)
        if total <= 0 or saving_ms <= 0:
            return None
        scale = saving_ms * self.tokens * 1e6 / total
        ci = per_token_interval(
            [per_step.get(sc.step, 0) * scale for sc in self.steps], [sc.tokens for sc in self.steps]
        )
        return (round(ci[0], 4), round(ci[1], 4)) if ci else None

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
