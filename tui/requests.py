"""One row per request: queue time, TTFT, tokens so far, TPOT and end-to-end latency."""

from __future__ import annotations

from textual.widgets import DataTable

from .model import RequestRow

COLUMNS = ("request", "state", "queue ms", "TTFT ms", "tokens", "TPOT ms", "e2e ms")


def _ms(ns: int | float | None) -> str:
    return "-" if ns is None else f"{ns / 1e6:.1f}"


def cells(r: RequestRow) -> tuple[str, ...]:
    state = (
        f"done ({r.reason})"
        if r.done and r.reason
        else "done"
        if r.done
        else "running"
        if r.first_token_ns is not None
        else "waiting"
    )
    return (r.req, state, _ms(r.queue_ns), _ms(r.ttft), str(r.tokens), _ms(r.tpot), _ms(r.e2e))


class RequestTable(DataTable):
    """Updated in place: new requests are appended, changed cells rewritten."""

    def __init__(self, **kw):
        super().__init__(cursor_type="row", zebra_stripes=True, **kw)
        self._shown: dict[str, tuple[str, ...]] = {}

    def on_mount(self) -> None:
        for c in COLUMNS:
            self.add_column(c, key=c)

    def show(self, rows: dict[str, RequestRow]) -> None:
        for key, r in rows.items():
            new, old = cells(r), self._shown.get(key)
            if old is None:
                self.add_row(*new, key=key)
            elif new != old:
                for col, a, b in zip(COLUMNS, old, new):
                    if a != b:
                        self.update_cell(key, col, b)
            self._shown[key] = new
