"""The llmtrace TUI: a header over four tabs (overview, call chain, suggestions, requests).

Live (`feed` given): the feed is polled every POLL_S, the model aggregates what arrived,
the widgets redraw at REDRAW_S (never per record), and the analyzer's rules run on the
recent window every SUGGEST_S in a worker thread. Finished (`report` given): the report
of the whole run is shown as `llmtrace analyze` computes it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.widgets import DataTable, Footer, TabbedContent, TabPane
from textual.worker import Worker

from llmtrace.analyze.report_schema import BreakdownView, Report
from llmtrace.timeline import Trace

from .callchain import CallChain
from .feed import SpoolFeed
from .header import RunHeader, RunInfo
from .model import ALL, DECODE, PHASES, RunModel, StepView
from .requests import RequestTable
from .sparklines import StepSparklines
from .stages import StagePanel
from .suggestions import SuggestionScreen, SuggestionTable

POLL_S = 0.1
REDRAW_S = 0.4
SUGGEST_S = 3.0
TRACE_JSON = "trace.json"
TABS = ("overview", "chain", "suggestions", "requests")


class LlmtraceApp(App):
    CSS_PATH = "app.tcss"
    TITLE = "llmtrace"
    ENABLE_COMMAND_PALETTE = False
    BINDINGS = [
        Binding("q", "quit", "Quit"),
        Binding("e", "export", "Export"),
        Binding("1", "tab('overview')", "Overview"),
        Binding("2", "tab('chain')", "Chain"),
        Binding("3", "tab('suggestions')", "Hints"),
        Binding("4", "tab('requests')", "Requests"),
        Binding("left_square_bracket", "step(-1)", "Prev step"),
        Binding("right_square_bracket", "step(1)", "Next step"),
        Binding("s", "slowest", "Slowest"),
        Binding("p", "phase", "All/decode/prefill"),
    ]

    def __init__(
        self,
        model: RunModel,
        info: RunInfo,
        run_dir: str | None,
        *,
        feed: SpoolFeed | None = None,
        report: Report | None = None,
        trace: Trace | None = None,
        source: str | None = None,
    ):
        super().__init__()
        self.model, self.info, self.run_dir = model, info, run_dir
        self.feed, self.report, self.trace, self.source = feed, report, trace, source
        self.state = "live" if feed is not None else "finished run"
        # Set from the workload's thread (plain stores, read by the timers): requests done,
        # and what to show once the workload ended.
        self.requests_done: int | None = None
        self.workload_ended: str | None = None
        self._ended_shown = False
        self._drawn = -1  # the model version on screen
        self._breakdown: BreakdownView | None = None  # live: the window's breakdown as of that version
        self._suggesting: Worker | None = None
        self._suggested = -1  # the model version the suggestions were computed on
        self._step_id: int | None = None  # the call chain's step; None follows the latest
        self._slowest = False
        self._phase = ALL  # the steps the breakdown covers
        # kept, not queried: queries go to the active screen, which may be a suggestion's
        self.header = RunHeader(id="header")
        self.tabs = TabbedContent(initial="overview")
        self.stages = StagePanel(id="stages")
        self.sparklines = StepSparklines(id="sparklines")
        self.chain = CallChain(id="callchain")
        self.suggestions = SuggestionTable(id="suggestion-table")
        self.request_table = RequestTable(id="request-table")

    @property
    def live(self) -> bool:
        return self.feed is not None

    def compose(self) -> ComposeResult:
        yield self.header
        with self.tabs:
            with TabPane("Overview [1]", id="overview"):
                yield self.stages
                yield self.sparklines
            with TabPane("Call chain [2]", id="chain"):
                yield self.chain
            with TabPane("Suggestions [3]", id="suggestions"):
                yield self.suggestions
            with TabPane("Requests [4]", id="requests"):
                yield self.request_table
        yield Footer()

    def on_mount(self) -> None:
        if self.report is not None:
            self.suggestions.show(self.report["suggestions"])
        else:
            self.set_interval(POLL_S, self.poll)
            self.set_interval(SUGGEST_S, self.refresh_suggestions)
        self.set_interval(REDRAW_S, self.redraw)
        self.redraw()

    # -- data ------------------------------------------------------------------------------
    def poll(self) -> None:
        if self.feed is None:  # a finished run has no feed
            return
        self.model.ingest(self.feed.poll())
        if self.workload_ended is not None and not self._ended_shown:
            self._ended_shown = True
            self.workload_finished(self.workload_ended)
        self.model.settle()

    def refresh_suggestions(self) -> None:
        """Run the rules on the window if it changed and no run of them is still going
        (a thread cannot be cancelled: starting another would only add load)."""
        m = self.model
        busy = self._suggesting is not None and not self._suggesting.is_finished
        if busy or not m.steps or m.version == self._suggested:
            return
        self._suggested = m.version
        self._suggesting = self._suggest(m.window_trace())

    @work(thread=True, group="suggest")
    def _suggest(self, window: Trace) -> None:
        from llmtrace.analyze import build_report

        suggestions = build_report(window)["suggestions"]
        self.call_from_thread(self.suggestions.show, suggestions)

    def workload_finished(self, message: str) -> None:
        """The workload ended: every step recorded so far is whole."""
        self.state = message
        self.model.settle(everything=True)
        self.redraw(force=True)

    # -- drawing ---------------------------------------------------------------------------
    def redraw(self, force: bool = False) -> None:
        """The header every time (its rates and counts move); the rest when the model changed."""
        m = self.model
        changed = force or m.version != self._drawn
        self._drawn = m.version
        summary: Mapping[str, Any]
        breakdown: BreakdownView | None
        if self.report is not None:  # a finished run: the report's numbers
            summary, overall = self.report["summary"], self.report["breakdown"]
            breakdown = overall
            if overall is not None and self._phase != ALL:
                breakdown = overall["decode"] if self._phase == DECODE else overall["prefill"]
            scope = f"all {overall['steps']} steps" if overall else ""
        else:
            summary, scope = m.live_summary(), f"the last {len(m.steps)} steps"
            if changed:
                self._breakdown = m.breakdown_view(self._phase)
            breakdown = self._breakdown
        if self._phase != ALL:
            scope = f"the {breakdown['steps'] if breakdown else 0} {self._phase} steps of " + scope
        done = self.requests_done if self.requests_done is not None else m.requests_done
        self.header.show(self.info, summary, done, breakdown, self._state_text())
        if not changed:
            return
        self.stages.show(breakdown, scope)
        self.sparklines.show(m.step_ms, m.batch)
        self.request_table.show(m.requests)
        if self._step_id is None:
            self._show_step(m.steps[-1] if m.steps else None)

    def _state_text(self) -> str:
        if self.feed is None:
            return self.state
        problems, late = self.feed.problems, self.model.late_spans
        return (
            f"{self.state}  {self.model.records_total} records"
            + (f"  {late} late spans ignored" if late else "")
            + (f"  ({problems[0]})" if problems else "")
        )

    def _show_step(self, view: StepView | None) -> None:
        self.chain.show(view, self.model.processes, self._slowest)

    # -- actions ---------------------------------------------------------------------------
    def action_tab(self, tab: str) -> None:
        self.tabs.active = tab

    def action_phase(self) -> None:
        """Cycle the breakdown over all steps, the decode steps only, the prefill steps only."""
        self._phase = PHASES[(PHASES.index(self._phase) + 1) % len(PHASES)]
        self.redraw(force=True)
        self.action_tab("overview")

    def action_step(self, delta: int) -> None:
        steps = self.model.steps
        if not steps:
            return
        ids = [v.cost.step for v in steps]
        cur = ids.index(self._step_id) if self._step_id in ids else len(ids) - 1
        i = max(0, min(len(ids) - 1, cur + delta))
        self._step_id = None if self.live and i == len(ids) - 1 else ids[i]  # the newest: follow again
        self._slowest = False
        self._show_step(steps[i])
        self.action_tab("chain")

    def action_slowest(self) -> None:
        if not self.model.steps:
            return
        view = max(self.model.steps, key=lambda v: v.cost.wall_ns)
        self._step_id, self._slowest = view.cost.step, True
        self._show_step(view)
        self.action_tab("chain")

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        if isinstance(event.data_table, SuggestionTable):
            i = event.cursor_row
            self.push_screen(SuggestionScreen(event.data_table.suggestions[i], i + 1))

    def action_export(self) -> None:
        if self.run_dir is None:
            self.notify("no run directory to export into", severity="warning")
            return
        path = os.path.join(self.run_dir, TRACE_JSON)
        if self.source and os.path.abspath(self.source) == os.path.abspath(path):
            self.notify(f"this trace already is {path}")
            return
        self.notify(f"exporting to {path}…")
        self._export(path, self.run_dir)

    @work(thread=True, exclusive=True, group="export")
    def _export(self, path: str, run_dir: str) -> None:
        from llmtrace.errors import UserError
        from llmtrace.export.chrome import write_chrome_trace
        from llmtrace.load import load_trace

        try:
            trace = self.trace if self.trace is not None else load_trace(run_dir)  # live: the spool so far
            stats = write_chrome_trace(trace, path, meta=trace.meta)
        except (UserError, OSError) as e:
            self.call_from_thread(self.notify, f"export failed: {e}", severity="error")
            return
        self.call_from_thread(self.notify, f"wrote {stats.events} events to {path} (open in ui.perfetto.dev)")
