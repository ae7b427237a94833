"""The report for people: its sections in one order (`ReportRenderer.render`), drawn as
rich tables for a terminal (`TextRenderer`) or as markdown (`MarkdownRenderer`, report.md)."""

from __future__ import annotations

import io
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .. import names
from .analysis import saving_cells, saving_text
from .process_ends import describe
from .report_schema import (
    Breakdown,
    BreakdownView,
    DeviceSummary,
    OffStepRow,
    ProgramFunctionRow,
    Report,
    SuggestionEntry,
    Summary,
    Tracing,
    WholeRunRow,
)

if TYPE_CHECKING:
    from rich.console import Console


def escape(text: str) -> str:
    """Text as rich prints it literally (rich is imported only when a report is drawn)."""
    from rich.markup import escape as rich_escape

    return rich_escape(text)


OVERLAP_NOTE = "Each saving is estimated alone; findings can overlap, so savings do not simply add up."
NO_STEPS = (
    "No step loop found (no `llmtrace.step()` spans, no step ids, no repeated model call). "
    "Mark the serving loop with `for batch in llmtrace.steps(batches):` or `with llmtrace.step():`; "
    "time per stage over the whole run:"
)
STAGE_HEADER = ("stage", "ms/step", "ms/token", "share", "count", "p50 ms", "p99 ms", "top functions (ms/token)")
OFF_STEPS_TITLE = "Off the step loop: threads that run no step (per process and stage)"
OFF_STEPS_HEADER = ("process", "stage", "spans", "total ms", "mean ms")
RULE_FAILED = "rule failed on this trace (a bug in llmtrace; the other rules ran)"
OWN_FUNCTIONS = "The program's own functions its threads were busy in (stack samples):"


class ReportRenderer(ABC):
    """The sections of a report, in order; a subclass draws each and `finish`es the text."""

    def render(self, report: Report) -> str:
        self.summary(report["summary"])
        for end in report["process_ends"]:
            self.warning(describe(end))
        bd = report["breakdown"]
        if bd is None:
            self.whole_run(report["whole_run"] or [], report["whole_run_functions"] or [])
        else:
            self.breakdown(bd)
            if report["off_steps"]:
                self.off_steps(report["off_steps"])
        self.suggestions(report["suggestions"])
        for err in report["rule_errors"]:
            self.rule_error(err)
        self.tracing(report["tracing"], clock_lines(report["meta"]))
        return self.finish()

    @abstractmethod
    def summary(self, s: Summary) -> None: ...

    @abstractmethod
    def warning(self, text: str) -> None: ...

    @abstractmethod
    def whole_run(self, stages: list[WholeRunRow], functions: list[ProgramFunctionRow]) -> None: ...

    @abstractmethod
    def breakdown(self, bd: Breakdown) -> None: ...

    @abstractmethod
    def off_steps(self, rows: list[OffStepRow]) -> None: ...

    @abstractmethod
    def suggestions(self, sugg: list[SuggestionEntry]) -> None: ...

    @abstractmethod
    def rule_error(self, err: str) -> None: ...

    @abstractmethod
    def tracing(self, t: Tracing, clock: list[str]) -> None: ...

    @abstractmethod
    def finish(self) -> str: ...


class TextRenderer(ReportRenderer):
    """Rich tables (`llmtrace analyze`, the end of `record` and `run`)."""

    def __init__(self, color: bool = False, width: int = 130):
        from rich.console import Console

        self.color = color
        self.console: Console = Console(
            file=io.StringIO(), record=True, width=width, force_terminal=color, color_system="auto" if color else None
        )

    def _table(
        self,
        title: str,
        header: tuple[str, ...],
        rows: Sequence[tuple[str, ...]],
        right: set[str],
        show_header: bool = True,
    ) -> None:
        from rich.table import Table

        table = Table(title=title, show_header=show_header)
        for h in header:
            table.add_column(h, justify="right" if h in right else "left")
        for row in rows:
            table.add_row(*map(escape, row))
        self.console.print(table)

    def _print(self, text: str, style: str = "") -> None:
        self.console.print(f"[{style}]{escape(text)}[/{style}]" if style else escape(text))

    def summary(self, s: Summary) -> None:
        self._table("Serving summary", ("metric", "value"), summary_rows(s), set(), show_header=False)

    def warning(self, text: str) -> None:
        self.console.print(f"[bold red]warning:[/bold red] {escape(text)}")

    def whole_run(self, stages: list[WholeRunRow], functions: list[ProgramFunctionRow]) -> None:
        self._print(NO_STEPS)
        for row in stages:
            self._print(f"  {row['stage']:<16} {row['ms']:>10.3f} ms")
        if functions:
            self._print(OWN_FUNCTIONS)
            for f in functions:
                self._print(f"  {f['function']:<60} {f['ms']:>10.3f} ms")

    def breakdown(self, bd: Breakdown) -> None:
        self.console.print(
            f"\n[bold]{escape(bd['headline'])}[/bold]  (overhead {bd['overhead_fraction']:.0%}, "
            f"{bd['steps']} steps, {bd['tokens']} tokens)"
        )
        for note in bd["steps_from"]["notes"]:
            self._print(note, "dim")
        if bd["device"]:
            self._print(device_line(bd["device"]))
        views: list[tuple[str, BreakdownView | None]] = [
            ("all steps", bd),
            ("decode", bd["decode"]),
            ("prefill", bd["prefill"]),
        ]
        for title, view in views:
            if view is None or (title != "all steps" and view["steps"] == bd["steps"]):
                continue
            self._table(
                f"Per-token breakdown: {title} ({view['per_token_ms']:.3f} ms/token)",
                STAGE_HEADER,
                stage_rows(view),
                set(STAGE_HEADER[1:-1]),
            )

    def off_steps(self, rows: list[OffStepRow]) -> None:
        self._table(OFF_STEPS_TITLE, OFF_STEPS_HEADER, off_step_rows(rows), set(OFF_STEPS_HEADER[2:]))

    def suggestions(self, sugg: list[SuggestionEntry]) -> None:
        if not sugg:
            self._print("No suggestions: no known antipattern found in this trace.")
            return
        self._table(
            "Suggestions (ranked by estimated saving)",
            ("#", "id", "stage", "finding", "saves ms/token", "speedup"),
            [(str(i), s["id"], s["stage"], s["title"], *saving_cells(s)) for i, s in enumerate(sugg, 1)],
            {"#", "saves ms/token", "speedup"},
        )
        for i, s in enumerate(sugg, 1):
            impact = f" ({escape(s['impact'])})" if s["impact"] else ""
            self.console.print(f"{i}. [bold]{s['id']}[/bold]{impact}: {escape(s['fix'])}")
        self._print(OVERLAP_NOTE, "dim")

    def rule_error(self, err: str) -> None:
        self._print(f"{RULE_FAILED}: {err}", "red")

    def tracing(self, t: Tracing, clock: list[str]) -> None:
        for line in clock:
            self._print(line)
        cost = t["instrumentation_cost_us_per_token"]
        self._print(
            f"Tracing: {t['spans_recorded']} spans, {t['spans_dropped']} dropped"
            + (f", instrumentation ~{cost:.2f} us/token" if cost is not None else "")
        )
        if t["own_threads_cpu_share"] is not None and t["own_threads_cpu_ms"] is not None:
            self._print(
                f"llmtrace's own threads (stack sampler, spool flush): {t['own_threads_cpu_ms']:.0f} ms "
                f"of CPU, {t['own_threads_cpu_share']:.1%} of the program's"
            )

    def finish(self) -> str:
        return self.console.export_text(styles=self.color)


class MarkdownRenderer(ReportRenderer):
    """report.md."""

    def __init__(self) -> None:
        self.lines = ["# llmtrace report", ""]

    def _table(self, header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> None:
        self.lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        self.lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]

    def summary(self, s: Summary) -> None:
        self.lines += ["## Summary", ""]
        self._table(("metric", "value"), summary_rows(s))
        self.lines.append("")

    def warning(self, text: str) -> None:
        self.lines.append(f"**warning:** {text}")

    def whole_run(self, stages: list[WholeRunRow], functions: list[ProgramFunctionRow]) -> None:
        self.lines += ["", "## Per-token breakdown", "", NO_STEPS, ""]
        self._table(("stage", "ms (whole run)"), [(r["stage"], f"{r['ms']:.3f}") for r in stages])
        if functions:
            self.lines += ["", OWN_FUNCTIONS, ""]
            self._table(("function", "ms"), [(f["function"], f"{f['ms']:.3f}") for f in functions])

    def breakdown(self, bd: Breakdown) -> None:
        self.lines += [
            "",
            "## Per-token breakdown",
            "",
            f"**{bd['headline']}** (overhead {bd['overhead_fraction']:.0%})",
            "",
        ]
        self.lines += [f"_{note}_" for note in bd["steps_from"]["notes"]] + [""]
        self.lines += [device_line(bd["device"]), ""] if bd["device"] else []
        self._table(STAGE_HEADER, stage_rows(bd))

    def off_steps(self, rows: list[OffStepRow]) -> None:
        self.lines += ["", OFF_STEPS_TITLE, ""]
        self._table(OFF_STEPS_HEADER, off_step_rows(rows))

    def suggestions(self, sugg: list[SuggestionEntry]) -> None:
        self.lines += ["", "## Suggestions", ""]
        for i, s in enumerate(sugg, 1):
            self.lines.append(f"{i}. **{s['title']}** (`{s['id']}`, stage {s['stage']}): {saving_text(s)}. {s['fix']}")
        self.lines.append(f"_{OVERLAP_NOTE}_" if sugg else "No known antipattern found.")

    def rule_error(self, err: str) -> None:
        self.lines.append(f"**{RULE_FAILED}**: {err}")

    def tracing(self, t: Tracing, clock: list[str]) -> None:
        self.lines += ["", "## Tracing", ""] + [f"{line}." for line in clock]
        cost = t["instrumentation_cost_us_per_token"]
        self.lines += [
            "",
            f"{t['spans_recorded']} spans recorded, {t['spans_dropped']} dropped"
            + (f", ~{cost:.2f} us/token of instrumentation" if cost is not None else "")
            + ".",
        ]

    def finish(self) -> str:
        return "\n".join(self.lines) + "\n"


def render_text(report: Report, color: bool = False, width: int = 130) -> str:
    return TextRenderer(color, width).render(report)


def render_markdown(report: Report) -> str:
    return MarkdownRenderer().render(report)


def summary_rows(s: Summary) -> list[tuple[str, str]]:
    rows = [
        ("requests", str(s["requests"] if s["requests"] is not None else "-")),
        ("output tokens", str(s["output_tokens"])),
        ("steps", str(s["steps"])),
        ("duration", f"{s['duration_s']:.2f} s"),
        ("throughput", f"{s['throughput_tok_s']:.1f} tok/s"),
    ]
    for label, p in (
        ("TTFT", s["ttft_ms"]),
        ("TPOT", s["tpot_ms"]),
        ("ITL", s["itl_ms"]),
        ("e2e", s["e2e_ms"]),
        ("queue", s["queue_ms"]),
    ):
        if p:
            rows.append((f"{label} ms p50/p90/p99", f"{p['p50']:.2f} / {p['p90']:.2f} / {p['p99']:.2f}"))
    if s["request_links"]:
        linked = s["request_links"]
        how = ", ".join(f"{n} by {by}" for by, n in sorted(linked["by"].items()))
        rows.append(
            (
                "requests linked to steps",
                f"{linked['linked']} of {linked['requests']} ({how}): TTFT = end of the first step that served it",
            )
        )
    if s["batch_size"]:
        rows.append(("batch size mean / max", f"{s['batch_size']['mean']:.1f} / {s['batch_size']['max']:.0f}"))
    if s["kv_usage"]:
        rows.append(("KV usage peak", f"{s['kv_usage']['peak_fraction']:.0%}"))
    if s["preemptions"]:
        rows.append(("preemptions", str(s["preemptions"])))
    return rows


def off_step_rows(rows: list[OffStepRow]) -> list[tuple[str, ...]]:
    return [(r["process"], r["stage"], str(r["count"]), f"{r['ms']:.1f}", f"{r['mean_ms']:.3f}") for r in rows]


def stage_rows(view: BreakdownView) -> list[tuple[str, ...]]:
    model_share = f"{view['model_ms'] / view['per_token_ms']:.1%}" if view["per_token_ms"] else "-"
    rows: list[tuple[str, ...]] = [("model", "", f"{view['model_ms']:.3f}", model_share, "", "", "", "")]
    for r in view["stages"]:
        top = ", ".join(f"{f['name']} {f['ms_per_token']:.3f}" for f in r.get("top_functions", [])[:2])
        rows.append(
            (
                r["name"],
                f"{r['ms_per_step']:.3f}",
                f"{r['ms_per_token']:.3f}",
                f"{r['share']:.1%}",
                str(r["count"]),
                f"{r['p50_ms']:.3f}",
                f"{r['p99_ms']:.3f}",
                top,
            )
        )
    return rows


def clock_lines(meta: dict[str, object]) -> list[str]:
    """How processes of other hosts were put on this trace's clock (clock_align.py)."""
    alignment = meta.get(names.M_CLOCK_ALIGNMENT)
    out = []
    for d in alignment.get("domains", []) if isinstance(alignment, dict) else []:
        how = (
            f"{d['round_trips']} round trips, uncertainty +-{d['uncertainty_ns'] / 1e3:.0f} us"
            if d["method"] == "round trips"
            else "their Unix clocks only (no message round trips; NTP's accuracy)"
        )
        out.append(f"Clock: {', '.join(d['processes'])} on another host's clock, aligned by {how}")
    return out


def device_line(d: DeviceSummary) -> str:
    """The GPU's own account of the model spans it has records for (analyze/device.py)."""
    return (
        f"Device (kernel records of {d['spans']} of {d['timed_spans']} model spans): busy "
        f"{1 - d['idle_share']:.1%} of their CUDA-event time, idle {d['idle_share']:.1%} between kernels; "
        f"{d['kernels_per_span']:.0f} kernels and {d['launches_per_span']:.0f} launches per span, "
        f"{d['idle_us_per_kernel']:.2f} us idle per kernel"
    )
