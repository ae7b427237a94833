"""`llmtrace diff BEFORE AFTER [--json|--markdown]`: two runs (run directories, spool
directories or trace.json files) compared per breakdown row, with 95% intervals and a
significant / within-noise verdict per row, and the findings gone, kept and new."""

from __future__ import annotations

import json
import sys

from ..errors import UserError


def main(args) -> int:
    from ..analyze import build_report
    from ..analyze.analysis import Analysis
    from ..analyze.diff import diff_runs, render_markdown, render_text
    from ..load import load_trace, truncation_warnings

    if args.json and args.markdown:
        raise UserError("choose one of --json and --markdown")
    ctxs, reports = [], []
    for path in (args.before, args.after):
        trace = load_trace(path)
        for warning in truncation_warnings(trace):
            print(f"llmtrace diff: {warning}", file=sys.stderr)
        reports.append(build_report(trace))
        ctxs.append(Analysis(trace))
    try:
        d = diff_runs(ctxs[0], ctxs[1], reports[0], reports[1])
    except ValueError as e:
        raise UserError(str(e)) from None
    names = (args.before, args.after)
    if args.json:
        print(json.dumps({"before": args.before, "after": args.after, **d}, indent=2))
    elif args.markdown:
        print(render_markdown(d, names), end="")
    else:
        print(render_text(d, names), end="")
    return 0
