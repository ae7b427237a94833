"""Step time and batch size over the run, as sparklines with their latest/p50/max."""

from __future__ import annotations

from collections.abc import Sequence

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Sparkline, Static

from llmtrace.analyze.stats import percentile


def _label(title: str, vals: Sequence[float], fmt: str) -> Text:
    if not vals:
        return Text.assemble((title, "bold"), ("  no steps yet", "dim"))
    s = sorted(vals)
    return Text.assemble(
        (title, "bold"),
        f"  last {fmt.format(vals[-1])}  p50 {fmt.format(percentile(s, 50))}"
        f"  max {fmt.format(s[-1])}  ({len(vals)} steps)",
    )


class StepSparklines(Vertical):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.step_label, self.batch_label = Static(), Static()
        self.step_line = Sparkline([], summary_function=max, id="step-ms")
        self.batch_line = Sparkline([], summary_function=max, id="batch-size")

    def compose(self) -> ComposeResult:
        yield self.step_label
        yield self.step_line
        yield self.batch_label
        yield self.batch_line

    def show(self, step_ms: Sequence[float], batch: Sequence[float]) -> None:
        self.step_label.update(_label("step time ms", step_ms, "{:.2f}"))
        self.batch_label.update(_label("batch size", batch, "{:.0f}"))
        self.step_line.data = list(step_ms)
        self.batch_line.data = list(batch)
