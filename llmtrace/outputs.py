"""What every recording command leaves in its run directory: trace.json (Perfetto),
report.json and report.md, plus the printed summary. `llmtrace run` and `llmtrace record`
both end here, so a run directory looks the same whoever made it."""

from __future__ import annotations

import os
import sys
import traceback

from .timeline import Trace

TRACE_JSON = "trace.json"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"


def default_out_dir() -> str:
    """runs/<timestamp>/, for a run that names no directory."""
    import time

    return os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))


def write_outputs(out: str, trace: Trace, failure: str | None = None, command: str = "run") -> int:
    """Write trace.json, report.json, report.md for `trace` into `out`, print the report;
    returns 1 when `failure` says the recorded program failed, else 0."""
    from .analyze.report import build_report, render_markdown, render_text
    from .export.chrome import write_chrome_trace

    write_chrome_trace(trace, os.path.join(out, TRACE_JSON), meta=trace.meta)
    try:
        report = build_report(trace)
    except Exception:  # noqa: BLE001 (an analyzer bug must not cost the recording)
        traceback.print_exc()
        print(
            f"\nllmtrace {command}: the analysis failed on this trace (a bug in llmtrace: please report it "
            f"with {out}/spool); the trace is kept: {out}/{TRACE_JSON}",
            file=sys.stderr,
        )
        return 1
    if failure:
        report["failure"] = failure
    write_json(report, os.path.join(out, REPORT_JSON))
    with open(os.path.join(out, REPORT_MD), "w") as f:
        f.write(render_markdown(report))
    print(render_text(report))
    print(f"\nwrote {out}/{TRACE_JSON} (open in https://ui.perfetto.dev), {REPORT_JSON}, {REPORT_MD}")
    if failure:
        print(f"\nllmtrace {command}: FAILED: {failure}", file=sys.stderr)
        return 1
    return 0


def write_json(data: dict, path: str) -> None:
    import orjson

    with open(path, "wb") as f:
        f.write(orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
