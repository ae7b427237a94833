"""`llmtrace export PATH -o trace.json`: a run as Chrome trace JSON (ui.perfetto.dev)."""
from __future__ import annotations

import os

from ..errors import UserError
from ..export import write_chrome_trace
from ..load import load_trace


def main(args) -> int:
    trace = load_trace(args.path)
    out_dir = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(out_dir):
        raise UserError(f"{args.output}: directory {out_dir} does not exist")
    try:
        stats = write_chrome_trace(trace, args.output)
    except OSError as e:
        raise UserError(f"{args.output}: cannot write: {e.strerror}") from None
    names = ", ".join(p.name for p in sorted(trace.processes.values(), key=lambda p: p.pid))
    print(f"wrote {stats.path}: {stats.events} events ({len(trace.spans)} spans, {stats.flows} flows, "
          f"{stats.foreign_events} foreign), {stats.processes} processes ({names}), {_size(stats.bytes)}")
    print("open it in https://ui.perfetto.dev or chrome://tracing")
    return 0


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    if n < 1 << 20:
        return f"{n / 1024:.1f} KiB"
    return f"{n / (1 << 20):.1f} MiB"
