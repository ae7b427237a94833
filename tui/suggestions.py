"""The analyzer's suggestions, ranked by estimated saving; Enter opens one's details."""

from __future__ import annotations

import json

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import DataTable, Static

from llmtrace.analyze.analysis import saving_cells, saving_text
from llmtrace.analyze.report_schema import SuggestionEntry

COLUMNS = ("#", "saves ms/tok", "speedup", "stage", "finding")


class SuggestionTable(DataTable):
    def __init__(self, **kw):
        super().__init__(cursor_type="row", zebra_stripes=True, **kw)
        self.suggestions: list[SuggestionEntry] = []

    def on_mount(self) -> None:
        self.add_columns(*COLUMNS)

    def show(self, suggestions: list[SuggestionEntry]) -> None:
        if suggestions == self.suggestions:
            return
        row = self.cursor_row
        self.suggestions = suggestions
        self.clear()
        for i, s in enumerate(suggestions):
            self.add_row(str(i + 1), *saving_cells(s), s["stage"], s["title"], key=str(i))
        if suggestions:
            self.move_cursor(row=min(row, len(suggestions) - 1))


def _evidence_lines(evidence: dict) -> Text:
    t = Text()
    for key, value in evidence.items():
        if isinstance(value, list) and value and isinstance(value[0], dict):
            t.append(f"{key}:\n", "bold")
            for item in value:
                t.append("  • " + ", ".join(f"{k}={v}" for k, v in item.items()) + "\n")
        else:
            shown = value if isinstance(value, str) else json.dumps(value, default=str)
            t.append(f"{key}: ", "bold").append(f"{shown}\n")
    return t


class SuggestionScreen(ModalScreen):
    """One suggestion in full: the finding, the evidence behind it, the fix and its saving."""

    BINDINGS = [Binding("escape,enter,q", "dismiss", "Close")]

    def __init__(self, suggestion: SuggestionEntry, rank: int):
        super().__init__()
        self.suggestion, self.rank = suggestion, rank

    def compose(self) -> ComposeResult:
        s = self.suggestion
        head = Text.assemble(
            (f"#{self.rank} {s['title']}\n", "bold"),
            (s["id"], "cyan"),
            f"  stage {s['stage']}\n",
            (saving_text(s), "bold green"),
        )
        with Vertical(id="suggestion-dialog"):
            yield Static(head)
            with VerticalScroll():
                yield Static(Text.assemble(("Fix\n", "bold underline"), s["fix"], "\n"))
                yield Static(Text("Evidence", style="bold underline") + Text("\n") + _evidence_lines(s["evidence"]))
            yield Static(Text("esc / enter: close", style="dim"))
