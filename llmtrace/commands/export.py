"""`llmtrace export PATH [-o FILE] [--force] [--otlp URL]`: a run as Chrome trace JSON
(ui.perfetto.dev), written next to its input unless -o says where; an existing file is
never overwritten without --force. With --otlp, the spans go to an OpenTelemetry receiver
instead (llmtrace/export/otlp.py)."""

from __future__ import annotations

import os

from ..errors import UserError
from ..export import write_chrome_trace
from ..load import load_trace
from ..outputs import TRACE_JSON
from ..timeline import Trace


def default_output(path: str) -> str:
    """trace.json in the run directory (a spool/ directory's parent), else <file>.trace.json."""
    path = os.path.abspath(path)
    if os.path.isdir(path):
        run = os.path.dirname(path) if os.path.basename(path) == "spool" else path
        return os.path.join(run, TRACE_JSON)
    return os.path.splitext(path)[0] + ".trace.json"


def writable_output(path: str, force: bool) -> str:
    """`path`, checked: its directory exists, and it does not unless --force."""
    out_dir = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(out_dir):
        raise UserError(f"{path}: directory {out_dir} does not exist")
    if os.path.exists(path) and not force:
        raise UserError(f"{path} exists; pass --force to overwrite it, or -o another file")
    return path


def main(args) -> int:
    if args.otlp:
        return _send_otlp(args)
    output = writable_output(args.output or default_output(args.path), args.force)
    trace = load_trace(args.path)
    try:
        stats = write_chrome_trace(trace, output)
    except OSError as e:
        raise UserError(f"{output}: cannot write: {e.strerror}") from None
    names = ", ".join(p.name for p in sorted(trace.processes.values(), key=lambda p: p.pid))
    print(
        f"wrote {stats.path}: {stats.events} events ({len(trace.spans)} spans, {stats.flows} flows, "
        f"{stats.foreign_events} foreign), {stats.processes} processes ({names}), {_size(stats.bytes)}"
    )
    for note in _notes(trace):
        print(f"note: {note}")
    print("open it in https://ui.perfetto.dev or chrome://tracing")
    return 0


def _send_otlp(args) -> int:
    from ..export import otlp

    if args.output:
        raise UserError("give either -o FILE or --otlp URL")
    trace = load_trace(args.path)
    batches, spans = otlp.send(trace, args.otlp)
    print(f"sent {spans} spans of {len(trace.processes)} processes to {args.otlp} in {batches} requests")
    return 0


def _notes(trace: Trace) -> list[str]:
    """What the recording lost: spans dropped on full buffers, spool files cut short."""
    notes = [f"{trace.spans_dropped} spans were dropped while recording (buffers full)"] if trace.spans_dropped else []
    notes += [
        f"{p.source} ends early at byte {p.truncated_at} ({p.truncation_reason}); exported what precedes it"
        for p in trace.processes.values()
        if p.truncated_at is not None
    ]
    return notes


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    if n < 1 << 20:
        return f"{n / 1024:.1f} KiB"
    return f"{n / (1 << 20):.1f} MiB"
