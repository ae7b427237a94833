"""The report (`report.json`, DESIGN.md; its shape: report_schema.py): summary, breakdown,
suggestions, tracing, built from one analysis of a trace. render.py draws it."""

from __future__ import annotations

from collections.abc import Iterable

from .. import names
from ..timeline import Trace
from .analysis import Analysis
from .functions import program_functions
from .process_ends import process_ends
from .render import render_markdown, render_text
from .report_schema import (
    REPORT_VERSION,
    Breakdown,
    OffStepRow,
    ProcessTracing,
    ProgramFunctionRow,
    Report,
    StageFunction,
    StepsFrom,
    Tracing,
    WholeRunRow,
)
from .rules import run_rules

__all__ = ["build_report", "render_markdown", "render_text"]
TOP_FUNCTIONS = 5


def _stage_functions(ctx: Analysis, stage: str) -> list[StageFunction]:
    """The stage's busiest functions (samples of a thread blocked in a wait left out)."""
    stats = ctx.functions.stats([c for c in ctx.functions.select(stage=stage, host_side=True) if not c.idle])
    return [
        {"name": f.name, "ms_per_token": round(ctx.ms_per_token(f.total_ns), 4), "count": f.count, "sources": f.sources}
        for f in stats[:TOP_FUNCTIONS]
    ]


def _breakdown(ctx: Analysis) -> Breakdown | None:
    bd = ctx.breakdown
    view = bd.view()
    if view is None:
        return None
    for row in view["stages"]:
        row["top_functions"] = _stage_functions(ctx, row["name"])
    return {
        **view,
        "decode": bd.view(bd.decode_steps()),
        "prefill": bd.view(bd.prefill_steps()),
        "steps_from": _steps_from(ctx),
        "device": ctx.device.to_dict() if ctx.device else None,
    }


def _steps_from(ctx: Analysis) -> StepsFrom:
    """How the steps were found, and what the report assumed, in words for the reader."""
    found = ctx.breakdown.found
    notes = [found.note] if found.note else []
    if not any(
        isinstance(sc.root.attrs.get(k), (int, float))
        for sc in ctx.steps
        for k in (names.A_OUTPUT_TOKENS, names.A_BATCH, names.A_TOKENS)
    ):
        notes.append(
            "no step recorded its tokens: one token per step assumed "
            "(`llmtrace.step(tokens=n)` or a `tokens` attr says how many)"
        )
    return {"source": found.profile.source, "idle_windows": found.idle_windows, "notes": notes}


def _top_level_time(ctx: Analysis, threads: Iterable[tuple[int, int]]) -> dict[tuple[str, str], list[int]]:
    """(process name, stage) -> [spans, ns] of the given threads' top-level spans."""
    rows: dict[tuple[str, str], list[int]] = {}
    for pid, tid in threads:
        proc = ctx.trace.processes.get(pid)
        for s in ctx.index.top_level(pid, tid):
            row = rows.setdefault((proc.name if proc else str(pid), s.stage), [0, 0])
            row[0] += 1
            row[1] += s.dur_ns
    return rows


def _off_steps(ctx: Analysis, top: int = 10) -> list[OffStepRow]:
    """Work of the threads that run no step (HTTP front ends, tokenizers, request handlers):
    per process and stage, its spans' count and time (each thread's top-level spans)."""
    step_threads = {(sc.root.pid, sc.root.tid) for sc in ctx.steps}
    step_threads |= {(s.pid, s.tid) for sc in ctx.steps for _, s in sc.stage_spans}
    rows = _top_level_time(ctx, {(s.pid, s.tid) for s in ctx.trace.spans} - step_threads)
    out: list[OffStepRow] = [
        {"process": p, "stage": st, "count": n, "ms": round(ns / 1e6, 3), "mean_ms": round(ns / n / 1e6, 3)}
        for (p, st), (n, ns) in rows.items()
    ]
    return sorted(out, key=lambda r: -r["ms"])[:top]


def _whole_run(ctx: Analysis) -> list[WholeRunRow]:
    """Without steps: where the run's time went, by stage (each thread's top-level spans)."""
    totals: dict[str, int] = {}
    for (_, stage), (_, ns) in _top_level_time(ctx, {(s.pid, s.tid) for s in ctx.trace.spans}).items():
        totals[stage] = totals.get(stage, 0) + ns
    return [{"stage": k, "ms": round(v / 1e6, 3)} for k, v in sorted(totals.items(), key=lambda kv: -kv[1])]


def _tracing(ctx: Analysis) -> Tracing:
    tr = ctx.trace
    counts: dict[int, list[int]] = {pid: [0, 0, 0] for pid in tr.processes}
    for group, i in ((tr.spans, 0), (tr.instants, 1), (tr.counters, 2)):
        for r in group:
            counts.setdefault(r.pid, [0, 0, 0])[i] += 1
    procs: list[ProcessTracing] = []
    cost_ns = 0.0
    for pid, (spans, instants, ctrs) in sorted(counts.items()):
        p = tr.processes.get(pid)
        span_cost = p.span_cost_ns if p else 0.0
        cost_ns += (spans + instants + ctrs) * span_cost
        procs.append(
            {
                "pid": pid,
                "name": p.name if p else str(pid),
                "spans": spans,
                "instants": instants,
                "counters": ctrs,
                "dropped": sum(p.dropped.values()) if p else 0,
                "span_cost_ns": span_cost,
                "truncated": bool(p and p.truncated_at is not None),
                "spans_open_at_stop": sum(1 for s in tr.spans if s.pid == pid and s.open_at_stop),
            }
        )
    own, total = ctx.cpu.own_share(tr) if ctx.cpu else (0.0, 0.0)
    return {
        "spans_recorded": len(tr.spans),
        "records": len(tr.spans) + len(tr.instants) + len(tr.counters),
        "spans_dropped": tr.spans_dropped,
        "stack_samples": len(tr.samples),
        "instrumentation_cost_us_per_token": cost_ns / ctx.tokens / 1e3 if ctx.tokens else None,
        # the sampler's and the flusher's CPU time (their GIL time is at most that)
        "own_threads_cpu_ms": round(own / 1e6, 1) if total else None,
        "own_threads_cpu_share": round(own / total, 4) if total else None,
        "processes": procs,
    }


def build_report(trace: Trace) -> Report:
    ctx = Analysis(trace)
    suggestions = [s.to_dict() for s in run_rules(ctx)]
    return {
        "version": REPORT_VERSION,
        "summary": ctx.metrics,
        "process_ends": process_ends(trace),
        "breakdown": _breakdown(ctx),
        "whole_run": None if ctx.steps else _whole_run(ctx),
        "whole_run_functions": None if ctx.steps else _program_functions(trace),
        "off_steps": _off_steps(ctx) if ctx.steps else [],
        "suggestions": suggestions,
        "rule_errors": ctx.rule_errors,
        "tracing": _tracing(ctx),
        "meta": trace.meta,
    }


def _program_functions(trace: Trace) -> list[ProgramFunctionRow]:
    return [{"function": f, "ms": round(ns / 1e6, 3)} for f, ns in program_functions(trace)]
