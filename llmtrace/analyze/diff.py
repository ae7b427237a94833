"""Two runs side by side (`llmtrace diff A B`): per breakdown row, ms per token before and
after, the change with a 95% bootstrap interval over steps, and whether it stands out of
the steps' own noise; the findings that went away, stayed or appeared.

A row's ms/token is its critical-path time summed over the steps divided by their tokens
(as the breakdown computes it). The interval resamples each run's steps with replacement
(RESAMPLES times, fixed seed) and takes the 2.5th and 97.5th percentiles of the change;
a change whose interval excludes zero is "significant", else "within noise".
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypedDict

from .analysis import Analysis
from .breakdown import MODEL
from .report_schema import Report, SuggestionEntry

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray

TOTAL = "per token"
RESAMPLES = 1000
SEED = 20261207


class Row(TypedDict):
    label: str
    before_ms: float
    after_ms: float
    change_ms: float
    change_pct: float | None
    ci_low_ms: float
    ci_high_ms: float
    significant: bool


class FindingChange(TypedDict):
    id: str
    status: str  # gone | new | still
    title: str
    before_ms: float | None
    after_ms: float | None


class Diff(TypedDict):
    steps: list[int]
    tokens: list[int]
    throughput_tok_s: list[float]
    rows: list[Row]
    findings: list[FindingChange]
    resamples: int


def _matrix(ctx: Analysis, labels: list[str]) -> NDArray[np.float64]:
    """[steps x (tokens, wall, labels...)] of a run's steps (numpy, imported here only)."""
    import numpy as np

    return np.array(
        [[sc.tokens, sc.wall_ns] + [sc.parts.get(lab, 0) for lab in labels] for sc in ctx.steps], dtype=np.float64
    ).reshape(len(ctx.steps), 2 + len(labels))


def _per_token_ms(m: NDArray[np.float64]) -> NDArray[np.float64]:
    """Per column after the tokens: ms per token of the steps in `m`."""
    per_token: NDArray[np.float64] = m[:, 1:].sum(axis=0) / max(float(m[:, 0].sum()), 1.0) / 1e6
    return per_token


def _rows(a: Analysis, b: Analysis) -> list[Row]:
    import numpy as np

    labels = sorted(
        {lab for ctx in (a, b) for sc in ctx.steps for lab in sc.parts}, key=lambda lab: (lab != MODEL, lab)
    )
    ma, mb = _matrix(a, labels), _matrix(b, labels)
    point = _per_token_ms(mb) - _per_token_ms(ma)
    rng = np.random.default_rng(SEED)
    boots = np.array(
        [
            _per_token_ms(mb[rng.integers(0, len(mb), len(mb))]) - _per_token_ms(ma[rng.integers(0, len(ma), len(ma))])
            for _ in range(RESAMPLES)
        ]
    )
    lo, hi = np.percentile(boots, [2.5, 97.5], axis=0)
    before, after = _per_token_ms(ma), _per_token_ms(mb)
    rows = []
    for i, label in enumerate([TOTAL] + labels):
        pct = float(point[i] / before[i] * 100) if before[i] else None
        rows.append(
            Row(
                label=label,
                before_ms=round(float(before[i]), 4),
                after_ms=round(float(after[i]), 4),
                change_ms=round(float(point[i]), 4),
                change_pct=None if pct is None else round(pct, 1),
                ci_low_ms=round(float(lo[i]), 4),
                ci_high_ms=round(float(hi[i]), 4),
                significant=bool(lo[i] > 0 or hi[i] < 0),
            )
        )
    return rows


def _findings(before: list[SuggestionEntry], after: list[SuggestionEntry]) -> list[FindingChange]:
    """Per finding id: its saving before and after (None where it was not found)."""
    a = {s["id"]: s for s in before}
    b = {s["id"]: s for s in after}
    out: list[FindingChange] = []
    for fid in list(a) + [f for f in b if f not in a]:
        sa, sb = a.get(fid), b.get(fid)
        status = "gone" if sb is None else "new" if sa is None else "still"
        either = sb if sb is not None else a[fid]
        out.append(
            {
                "id": fid,
                "status": status,
                "title": either["title"],
                "before_ms": sa["est_saving_ms_per_token"] if sa else None,
                "after_ms": sb["est_saving_ms_per_token"] if sb else None,
            }
        )
    return out


def diff_runs(a: Analysis, b: Analysis, report_a: Report, report_b: Report) -> Diff:
    if not a.steps or not b.steps:
        missing = "first" if not a.steps else "second"
        raise ValueError(f"the {missing} run has no step loop to compare (see `llmtrace analyze` on it)")
    sa, sb = report_a["summary"], report_b["summary"]
    return {
        "steps": [len(a.steps), len(b.steps)],
        "tokens": [a.tokens, b.tokens],
        "throughput_tok_s": [sa["throughput_tok_s"], sb["throughput_tok_s"]],
        "rows": _rows(a, b),
        "findings": _findings(report_a["suggestions"], report_b["suggestions"]),
        "resamples": RESAMPLES,
    }


def _verdict(r: Row) -> str:
    return "significant" if r["significant"] else "within noise"


def _cells(r: Row) -> tuple[str, ...]:
    pct = f"{r['change_pct']:+.1f}%" if r["change_pct"] is not None else "new"
    return (
        r["label"],
        f"{r['before_ms']:.3f}",
        f"{r['after_ms']:.3f}",
        f"{r['change_ms']:+.3f}",
        pct,
        f"[{r['ci_low_ms']:+.3f}, {r['ci_high_ms']:+.3f}]",
        _verdict(r),
    )


HEADER = ("row", "before ms/token", "after ms/token", "change", "change %", "95% interval", "")


def _finding_cell(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def render_text(d: Diff, names: tuple[str, str], width: int = 130) -> str:
    import io

    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(file=io.StringIO(), record=True, width=width)
    console.print(
        f"before: {escape(names[0])} ({d['steps'][0]} steps, {d['tokens'][0]} tokens)\n"
        f"after:  {escape(names[1])} ({d['steps'][1]} steps, {d['tokens'][1]} tokens)"
    )
    table = Table(
        title=f"Per-token breakdown, before -> after (95% bootstrap interval over steps, {d['resamples']} resamples)"
    )
    for h in HEADER:
        table.add_column(h, justify="left" if h in ("row", "") else "right")
    for r in d["rows"]:
        table.add_row(*_cells(r))
    console.print(table)
    if d["findings"]:
        table = Table(title="Findings (estimated saving, ms/token)")
        for h in ("id", "status", "before", "after"):
            table.add_column(h)
        for f in d["findings"]:
            table.add_row(f["id"], f["status"], _finding_cell(f["before_ms"]), _finding_cell(f["after_ms"]))
        console.print(table)
    return console.export_text()


def render_markdown(d: Diff, names: tuple[str, str]) -> str:
    lines = [
        "# llmtrace diff",
        "",
        f"before: `{names[0]}` ({d['steps'][0]} steps, {d['tokens'][0]} tokens); "
        f"after: `{names[1]}` ({d['steps'][1]} steps, {d['tokens'][1]} tokens)",
        "",
        "| " + " | ".join(HEADER[:-1] + ("verdict",)) + " |",
        "|" + "---|" * len(HEADER),
    ]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in d["rows"]]
    if d["findings"]:
        lines += ["", "| finding | status | before ms/token | after ms/token |", "|---|---|---|---|"]
        lines += [
            f"| {f['id']} | {f['status']} | {_finding_cell(f['before_ms'])} | {_finding_cell(f['after_ms'])} |"
            for f in d["findings"]
        ]
    return "\n".join(lines) + "\n"
