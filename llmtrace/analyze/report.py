"""The report (`report.json`, DESIGN.md): summary, breakdown, suggestions, tracing; and its
text (rich tables) and markdown renderings."""
from __future__ import annotations

import io
from typing import Any

from .. import names
from ..timeline import Trace
from .analysis import Analysis, saving_cells, saving_text
from .functions import program_functions
from .process_ends import describe, process_ends
from .rules import run_rules

REPORT_VERSION = 1
TOP_FUNCTIONS = 5
OVERLAP_NOTE = "Each saving is estimated alone; findings can overlap, so savings do not simply add up."
NO_STEPS = ("No step loop found (no `llmtrace.step()` spans, no step ids, no repeated model call). "
            "Mark the serving loop with `for batch in llmtrace.steps(batches):` or `with llmtrace.step():`; "
            "time per stage over the whole run:")


def _stage_functions(ctx: Analysis, stage: str) -> list[dict]:
    """The stage's busiest functions (samples of a thread blocked in a wait left out)."""
    stats = ctx.functions.stats([c for c in ctx.functions.select(stage=stage, host_side=True) if not c.idle])
    return [{"name": f.name, "ms_per_token": round(ctx.ms_per_token(f.total_ns), 4), "count": f.count,
             "sources": f.sources} for f in stats[:TOP_FUNCTIONS]]


def _breakdown(ctx: Analysis) -> dict | None:
    bd = ctx.breakdown
    view = bd.view()
    if view is None:
        return None
    for row in view["stages"]:
        row["top_functions"] = _stage_functions(ctx, row["name"])
    return {**view, "decode": bd.view(bd.decode_steps()), "prefill": bd.view(bd.prefill_steps()),
            "steps_from": _steps_from(ctx), "device": ctx.device.to_dict() if ctx.device else None}


def clock_lines(meta: dict) -> list[str]:
    """How processes of other hosts were put on this trace's clock (clock_align.py)."""
    out = []
    for d in (meta.get(names.M_CLOCK_ALIGNMENT) or {}).get("domains", []):
        how = (f"{d['round_trips']} round trips, uncertainty +-{d['uncertainty_ns'] / 1e3:.0f} us"
               if d["method"] == "round trips" else "their Unix clocks only (no message round trips; NTP's accuracy)")
        out.append(f"Clock: {', '.join(d['processes'])} on another host's clock, aligned by {how}")
    return out


def device_line(d: dict) -> str:
    """The GPU's own account of the model spans it has records for (analyze/device.py)."""
    return (f"Device (kernel records of {d['spans']} of {d['timed_spans']} model spans): busy "
            f"{1 - d['idle_share']:.1%} of their CUDA-event time, idle {d['idle_share']:.1%} between kernels; "
            f"{d['kernels_per_span']:.0f} kernels and {d['launches_per_span']:.0f} launches per span, "
            f"{d['idle_us_per_kernel']:.2f} us idle per kernel")


def _steps_from(ctx: Analysis) -> dict:
    """How the steps were found, and what the report assumed, in words for the reader."""
    found = ctx.breakdown.found
    notes = [found.note] if found.note else []
    if not any(isinstance(sc.root.attrs.get(k), (int, float)) for sc in ctx.steps
               for k in (names.A_OUTPUT_TOKENS, names.A_BATCH, names.A_TOKENS)):
        notes.append("no step recorded its tokens: one token per step assumed "
                     "(`llmtrace.step(tokens=n)` or a `tokens` attr says how many)")
    return {"source": found.profile.source, "idle_windows": found.idle_windows, "notes": notes}


def _top_level_time(ctx: Analysis, threads) -> dict[tuple[str, str], list[int]]:
    """(process name, stage) -> [spans, ns] of the given threads' top-level spans."""
    rows: dict[tuple[str, str], list[int]] = {}
    for pid, tid in threads:
        proc = ctx.trace.processes.get(pid)
        for s in ctx.index.top_level(pid, tid):
            row = rows.setdefault((proc.name if proc else str(pid), s.stage), [0, 0])
            row[0] += 1
            row[1] += s.dur_ns
    return rows


def _off_steps(ctx: Analysis, top: int = 10) -> list[dict]:
    """Work of the threads that run no step (HTTP front ends, tokenizers, request handlers):
    per process and stage, its spans' count and time (each thread's top-level spans)."""
    step_threads = {(sc.root.pid, sc.root.tid) for sc in ctx.steps}
    step_threads |= {(s.pid, s.tid) for sc in ctx.steps for _, s in sc.stage_spans}
    rows = _top_level_time(ctx, {(s.pid, s.tid) for s in ctx.trace.spans} - step_threads)
    out: list[dict[str, Any]] = [
        {"process": p, "stage": st, "count": n, "ms": round(ns / 1e6, 3), "mean_ms": round(ns / n / 1e6, 3)}
        for (p, st), (n, ns) in rows.items()]
    return sorted(out, key=lambda r: -r["ms"])[:top]


def _whole_run(ctx: Analysis) -> list[dict]:
    """Without steps: where the run's time went, by stage (each thread's top-level spans)."""
    totals: dict[str, int] = {}
    for (_, stage), (_, ns) in _top_level_time(ctx, {(s.pid, s.tid) for s in ctx.trace.spans}).items():
        totals[stage] = totals.get(stage, 0) + ns
    return [{"stage": k, "ms": round(v / 1e6, 3)} for k, v in sorted(totals.items(), key=lambda kv: -kv[1])]


def _tracing(ctx: Analysis) -> dict:
    tr = ctx.trace
    counts: dict[int, list[int]] = {pid: [0, 0, 0] for pid in tr.processes}
    for group, i in ((tr.spans, 0), (tr.instants, 1), (tr.counters, 2)):
        for r in group:
            counts.setdefault(r.pid, [0, 0, 0])[i] += 1
    procs, cost_ns = [], 0.0
    for pid, (spans, instants, ctrs) in sorted(counts.items()):
        p = tr.processes.get(pid)
        span_cost = p.span_cost_ns if p else 0.0
        cost_ns += (spans + instants + ctrs) * span_cost
        procs.append({"pid": pid, "name": p.name if p else str(pid), "spans": spans, "instants": instants,
                      "counters": ctrs, "dropped": sum(p.dropped.values()) if p else 0, "span_cost_ns": span_cost,
                      "truncated": bool(p and p.truncated_at is not None),
                      "spans_open_at_stop": sum(1 for s in tr.spans if s.pid == pid and s.open_at_stop)})
    own, total = ctx.cpu.own_share(tr) if ctx.cpu else (0.0, 0.0)
    return {"spans_recorded": len(tr.spans), "records": len(tr.spans) + len(tr.instants) + len(tr.counters),
            "spans_dropped": tr.spans_dropped, "stack_samples": len(tr.samples),
            "instrumentation_cost_us_per_token": cost_ns / ctx.tokens / 1e3 if ctx.tokens else None,
            # the sampler's and the flusher's CPU time (their GIL time is at most that)
            "own_threads_cpu_ms": round(own / 1e6, 1) if total else None,
            "own_threads_cpu_share": round(own / total, 4) if total else None,
            "processes": procs}


def build_report(trace: Trace) -> dict:
    ctx = Analysis(trace)
    suggestions = [s.to_dict() for s in run_rules(ctx)]
    return {
        "version": REPORT_VERSION,
        "summary": ctx.metrics,
        "process_ends": process_ends(trace),
        "breakdown": _breakdown(ctx),
        "whole_run": None if ctx.steps else _whole_run(ctx),
        "whole_run_functions": None if ctx.steps else [{"function": f, "ms": round(ns / 1e6, 3)}
                                                       for f, ns in program_functions(trace)],
        "off_steps": _off_steps(ctx) if ctx.steps else [],
        "suggestions": suggestions,
        "rule_errors": ctx.rule_errors,
        "tracing": _tracing(ctx),
        "meta": trace.meta,
    }


# -- rendering ---------------------------------------------------------------------------

def _pct(d: dict | None, key: str) -> str:
    return f"{d[key]:.2f}" if d else "-"


def _summary_rows(s: dict) -> list[tuple[str, str]]:
    rows = [("requests", str(s["requests"] if s["requests"] is not None else "-")),
            ("output tokens", str(s["output_tokens"])), ("steps", str(s["steps"])),
            ("duration", f"{s['duration_s']:.2f} s"), ("throughput", f"{s['throughput_tok_s']:.1f} tok/s")]
    for key, label in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2e_ms", "e2e"),
                       ("queue_ms", "queue")):
        if s.get(key):
            rows.append((f"{label} ms p50/p90/p99", " / ".join(_pct(s[key], p) for p in ("p50", "p90", "p99"))))
    if s.get("request_links"):
        linked = s["request_links"]
        how = ", ".join(f"{n} by {by}" for by, n in sorted(linked["by"].items()))
        rows.append(("requests linked to steps", f"{linked['linked']} of {linked['requests']} ({how}): TTFT = "
                     "end of the first step that served it"))
    if s.get("batch_size"):
        rows.append(("batch size mean / max", f"{s['batch_size']['mean']:.1f} / {s['batch_size']['max']:.0f}"))
    if s.get("kv_usage"):
        rows.append(("KV usage peak", f"{s['kv_usage']['peak_fraction']:.0%}"))
    if s.get("preemptions"):
        rows.append(("preemptions", str(s["preemptions"])))
    return rows


def _stage_rows(bd: dict) -> list[tuple]:
    rows = [("model", "", f"{bd['model_ms']:.3f}",
             f"{bd['model_ms'] / bd['per_token_ms']:.1%}" if bd["per_token_ms"] else "-", "", "", "", "")]
    for r in bd["stages"]:
        top = ", ".join(f"{f['name']} {f['ms_per_token']:.3f}" for f in r.get("top_functions", [])[:2])
        rows.append((r["name"], f"{r['ms_per_step']:.3f}", f"{r['ms_per_token']:.3f}", f"{r['share']:.1%}",
                     str(r["count"]), f"{r['p50_ms']:.3f}", f"{r['p99_ms']:.3f}", top))
    return rows


STAGE_HEADER = ("stage", "ms/step", "ms/token", "share", "count", "p50 ms", "p99 ms", "top functions (ms/token)")


def render_text(report: dict, color: bool = False, width: int = 130) -> str:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(file=io.StringIO(), record=True, width=width, force_terminal=color,
                      color_system="auto" if color else None)
    summary = Table(title="Serving summary", show_header=False)
    for k, v in _summary_rows(report["summary"]):
        summary.add_row(k, v)
    console.print(summary)
    for end in report.get("process_ends") or []:
        console.print(f"[bold red]warning:[/bold red] {escape(describe(end))}")
    bd = report["breakdown"]
    if bd is None:
        console.print(escape(NO_STEPS))
        for row in report.get("whole_run") or []:
            console.print(f"  {row['stage']:<16} {row['ms']:>10.3f} ms")
        if report.get("whole_run_functions"):
            console.print("The program's own functions its threads were busy in (stack samples):")
            for row in report["whole_run_functions"]:
                console.print(f"  {escape(row['function']):<60} {row['ms']:>10.3f} ms")
    else:
        console.print(f"\n[bold]{escape(bd['headline'])}[/bold]  (overhead {bd['overhead_fraction']:.0%}, "
                      f"{bd['steps']} steps, {bd['tokens']} tokens)")
        for note in bd.get("steps_from", {}).get("notes", []):
            console.print(f"[dim]{escape(note)}[/dim]")
        if bd.get("device"):
            console.print(escape(device_line(bd["device"])))
        for title, view in (("all steps", bd), ("decode", bd.get("decode")), ("prefill", bd.get("prefill"))):
            if view is None or (title != "all steps" and view["steps"] == bd["steps"]):
                continue
            table = Table(title=f"Per-token breakdown: {title} ({view['per_token_ms']:.3f} ms/token)")
            for h in STAGE_HEADER:
                table.add_column(h, justify="left" if h in ("stage", STAGE_HEADER[-1]) else "right")
            for row in _stage_rows(view):
                table.add_row(*row)
            console.print(table)
        if report.get("off_steps"):
            table = Table(title="Off the step loop: threads that run no step (per process and stage)")
            for h in ("process", "stage", "spans", "total ms", "mean ms"):
                table.add_column(h, justify="left" if h in ("process", "stage") else "right")
            for r in report["off_steps"]:
                table.add_row(escape(r["process"]), r["stage"], str(r["count"]), f"{r['ms']:.1f}",
                              f"{r['mean_ms']:.3f}")
            console.print(table)
    sugg = report["suggestions"]
    if sugg:
        table = Table(title="Suggestions (ranked by estimated saving)")
        for h in ("#", "id", "stage", "finding", "saves ms/token", "speedup"):
            table.add_column(h, justify="right" if h in ("#", "saves ms/token", "speedup") else "left")
        for i, s in enumerate(sugg, 1):
            table.add_row(str(i), s["id"], s["stage"], escape(s["title"]), *saving_cells(s))
        console.print(table)
        for i, s in enumerate(sugg, 1):
            impact = f" ({escape(s['impact'])})" if s.get("impact") else ""
            console.print(f"{i}. [bold]{s['id']}[/bold]{impact}: {escape(s['fix'])}")
        console.print(f"[dim]{OVERLAP_NOTE}[/dim]")
    else:
        console.print("No suggestions: no known antipattern found in this trace.")
    for err in report.get("rule_errors") or []:
        console.print(f"[red]rule failed on this trace (a bug in llmtrace; the other rules ran):[/red] {escape(err)}")
    for line in clock_lines(report.get("meta") or {}):
        console.print(escape(line))
    t = report["tracing"]
    cost = t["instrumentation_cost_us_per_token"]
    console.print(f"Tracing: {t['spans_recorded']} spans, {t['spans_dropped']} dropped, "
                  f"instrumentation ~{cost:.2f} us/token" if cost is not None else
                  f"Tracing: {t['spans_recorded']} spans, {t['spans_dropped']} dropped")
    if t.get("own_threads_cpu_share") is not None:
        console.print(f"llmtrace's own threads (stack sampler, spool flush): {t['own_threads_cpu_ms']:.0f} ms of CPU, "
                      f"{t['own_threads_cpu_share']:.1%} of the program's")
    return console.export_text(styles=color)


def _md_table(header, rows) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    return out


def render_markdown(report: dict) -> str:
    lines = ["# llmtrace report", "", "## Summary", ""]
    lines += _md_table(("metric", "value"), _summary_rows(report["summary"]))
    lines += [""] + [f"**warning:** {describe(end)}" for end in report.get("process_ends") or []]
    bd = report["breakdown"]
    lines += ["", "## Per-token breakdown", ""]
    if bd is None:
        lines.append(NO_STEPS)
        whole = [(r["stage"], r["ms"]) for r in report.get("whole_run") or []]
        lines += [""] + _md_table(("stage", "ms (whole run)"), whole)
        if report.get("whole_run_functions"):
            lines += ["", "The program's own functions its threads were busy in (stack samples):", ""]
            lines += _md_table(("function", "ms"), [(r["function"], r["ms"]) for r in report["whole_run_functions"]])
    else:
        lines += [f"**{bd['headline']}** (overhead {bd['overhead_fraction']:.0%})", ""]
        lines += [f"_{note}_" for note in bd.get("steps_from", {}).get("notes", [])] + [""]
        lines += [device_line(bd["device"]), ""] if bd.get("device") else []
        lines += _md_table(STAGE_HEADER, _stage_rows(bd))
    lines += ["", "## Suggestions", ""]
    for i, s in enumerate(report["suggestions"], 1):
        lines += [f"{i}. **{s['title']}** (`{s['id']}`, stage {s['stage']}): {saving_text(s)}. {s['fix']}"]
    lines.append("" if report["suggestions"] else "No known antipattern found.")
    if report["suggestions"]:
        lines.append(f"_{OVERLAP_NOTE}_")
    lines += [f"**rule failed on this trace** (a bug in llmtrace; the other rules ran): {err}"
              for err in report.get("rule_errors") or []]
    t = report["tracing"]
    lines += ["", "## Tracing", ""] + [f"{line}." for line in clock_lines(report.get("meta") or {})]
    lines += ["", f"{t['spans_recorded']} spans recorded, {t['spans_dropped']} dropped"
              + (f", ~{t['instrumentation_cost_us_per_token']:.2f} us/token of instrumentation"
                 if t["instrumentation_cost_us_per_token"] is not None else "") + "."]
    return "\n".join(lines) + "\n"
