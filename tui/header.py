"""The header: what ran (model, device), how fast (throughput, requests, TTFT/TPOT), and the
one-line answer (where a token's time goes)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from rich.text import Text
from textual.widgets import Static

from llmtrace.analyze.report_schema import BreakdownView


@dataclass
class RunInfo:
    model: str = "?"
    device: str = "?"
    total_requests: int | None = None

    @classmethod
    def from_config(cls, config: dict | None) -> RunInfo:
        """From `llmtrace run`'s config (config.yaml in the run dir, or trace.json's meta)."""
        if not config:
            return cls()
        model = config.get("model") or {}
        name = model.get("preset") or (os.path.basename(str(model["path"]).rstrip("/")) if model.get("path") else "?")
        return cls(name, str(model.get("device", "?")), (config.get("workload") or {}).get("num_requests"))


def _p(d: dict | None, unit: str = "ms") -> str:
    return f"p50 {d['p50']:.1f} p99 {d['p99']:.1f} {unit}" if d else "-"


class RunHeader(Static):
    def show(
        self, info: RunInfo, summary: Mapping[str, Any], done: int, breakdown: BreakdownView | None, state: str
    ) -> None:
        total = info.total_requests or summary.get("requests")
        now, avg = summary.get("throughput_now_tok_s"), summary.get("throughput_tok_s") or 0.0
        rate = f"{now:.1f} tok/s now, {avg:.1f} avg  " if now is not None else f"{avg:.1f} tok/s  "
        t = Text.assemble(
            ("llmtrace  ", "bold"),
            ("model ", "dim"),
            (info.model, "bold cyan"),
            ("  device ", "dim"),
            (info.device, "bold cyan"),
            "  ",
            (state, "bold green" if state.startswith("live") else "bold"),
            "\n",
        )
        t.append_text(
            Text.assemble(
                ("throughput ", "dim"),
                rate,
                ("requests ", "dim"),
                f"{done}/{total if total is not None else '?'}  ",
                ("tokens ", "dim"),
                f"{summary.get('output_tokens') or 0}  ",
                ("steps ", "dim"),
                f"{summary.get('steps') or 0}\n",
                ("TTFT ", "dim"),
                _p(summary.get("ttft_ms")),
                "   ",
                ("TPOT ", "dim"),
                _p(summary.get("tpot_ms"), "ms"),
                "\n",
            )
        )
        if breakdown:
            t.append(f"overhead {breakdown['overhead_fraction']:.0%}  ", "bold yellow")
            t.append(breakdown["headline"], "bold")
        else:
            t.append("waiting for engine steps…", "dim")
        t.no_wrap, t.overflow = True, "ellipsis"
        self.update(t)
