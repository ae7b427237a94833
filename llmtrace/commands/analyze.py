"""`llmtrace analyze PATH [--json|--markdown]`: the per-token overhead breakdown and the
ranked suggestions for a run directory, spool directory or trace.json."""

from __future__ import annotations

import json
import sys

from ..errors import UserError


def main(args) -> int:
    from ..analyze import build_report, render_markdown, render_text
    from ..load import load_trace, truncation_warnings

    if args.json and args.markdown:
        raise UserError("choose one of --json and --markdown")
    trace = load_trace(args.path)
    for warning in truncation_warnings(trace):
        print(f"llmtrace analyze: {warning}", file=sys.stderr)
    report = build_report(trace)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    elif args.markdown:
        print(render_markdown(report), end="")
    else:
        print(render_text(report, color=sys.stdout.isatty()), end="")
    return 0
