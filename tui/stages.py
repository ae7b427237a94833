"""Where a token's time goes: a stacked bar (model vs each overhead stage) over the stage
table (ms/step, ms/token, share, p50/p99), both sorted by cost."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import DataTable, Static

from llmtrace.analyze.report_schema import BreakdownView

MODEL = "model"
PALETTE = (
    "red",
    "yellow",
    "blue",
    "magenta",
    "cyan",
    "bright_red",
    "bright_yellow",
    "bright_blue",
    "bright_magenta",
    "bright_cyan",
)
MODEL_COLOR = "green"
BAR_STAGES = 6  # stages drawn separately in the bar; the rest are "other"
COLUMNS = ("stage", "ms/step", "ms/token", "share", "p50 ms", "p99 ms")


def stage_rows(view: BreakdownView) -> list[dict[str, Any]]:
    """The view's stages plus the model, as one list sorted by ms/token."""
    tokens_per_step = view["tokens"] / view["steps"] if view["steps"] else 0.0
    model = {
        "name": MODEL,
        "ms_per_step": view["model_ms"] * tokens_per_step,
        "ms_per_token": view["model_ms"],
        "share": view["model_ms"] / view["per_token_ms"] if view["per_token_ms"] else 0.0,
        "p50_ms": None,
        "p99_ms": None,
    }
    return sorted([model, *(dict(r) for r in view["stages"])], key=lambda r: -r["ms_per_token"])


def colors(rows: list[dict]) -> dict[str, str]:
    out, i = {}, 0
    for r in rows:
        if r["name"] == MODEL:
            out[MODEL] = MODEL_COLOR
        else:
            out[r["name"]] = PALETTE[i % len(PALETTE)]
            i += 1
    return out


class TokenBar(Static):
    """One output token's time as a bar: each stage's width is its share."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self._rows: list[dict] = []

    def show(self, rows: list[dict]) -> None:
        self._rows = rows
        self.refresh()

    def render(self) -> Text:
        rows = self._rows
        if not rows:
            return Text("no steps yet", style="dim")
        width = max(10, self.content_size.width)
        shown = rows[:BAR_STAGES]
        other = sum(r["share"] for r in rows[BAR_STAGES:])
        col = colors(rows)
        parts = [(r["name"], r["share"], col[r["name"]]) for r in shown]
        if other > 0:
            parts.append(("other", other, "white"))
        bar, legend = Text(no_wrap=True, overflow="ellipsis"), Text(no_wrap=True, overflow="ellipsis")
        cum = drawn = 0
        for name, share, color in parts:
            cum += share  # round the running total, so the bar never exceeds the width
            end = min(width, round(cum * width))
            bar.append("█" * (end - drawn), style=color)
            drawn = end
            legend.append("■ ", style=color).append(f"{name} {share:.0%}  ")
        return Text("\n", no_wrap=True).join([bar, legend])


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


class StagePanel(Vertical):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.heading = Static("", classes="panel-title")
        self.bar = TokenBar(classes="token-bar")
        self.table: DataTable[Text | str] = DataTable(cursor_type="row", zebra_stripes=True, classes="stage-table")

    def compose(self) -> ComposeResult:
        yield self.heading
        yield self.bar
        yield self.table

    def on_mount(self) -> None:
        self.table.add_columns(*COLUMNS)

    def show(self, view: BreakdownView | None, scope: str) -> None:
        if view is None:
            self.heading.update(Text(f"Per-token breakdown: no steps ({scope})", style="dim"))
            self.bar.show([])
            self.table.clear()
            return
        self.heading.update(
            Text.assemble(
                ("Per-token breakdown ", "bold"),
                f"{view['per_token_ms']:.3f} ms/token over {scope}",
                ("  p: all/decode/prefill", "dim"),
            )
        )
        rows = stage_rows(view)
        self.bar.show(rows)
        col = colors(rows)
        self.table.clear()
        for r in rows:
            self.table.add_row(
                Text(r["name"], style=col[r["name"]]),
                _ms(r["ms_per_step"]),
                _ms(r["ms_per_token"]),
                f"{r['share']:.1%}",
                _ms(r["p50_ms"]),
                _ms(r["p99_ms"]),
                key=r["name"],
            )
