"""`llmtrace merge A.json B.json ... -o merged.json`: llmtrace, viztracer, py-spy and
torch.profiler Chrome traces on one timeline (llmtrace/merge.py says how clocks align)."""

from __future__ import annotations

import os
import sys

from llmtrace.errors import UserError

from .export import writable_output


def main(args) -> int:
    from llmtrace.export.chrome import write_chrome_trace
    from llmtrace.merge import merge_files

    for p in args.inputs:
        if not os.path.isfile(p):
            raise UserError(f"{p}: no such file")
    writable_output(args.output, args.force)
    result = merge_files(args.inputs)
    meta = {"merged": [{"path": s.path, "kind": s.kind, "shift_us": s.shift_us or 0.0} for s in result.sources]}
    stats = write_chrome_trace(result.trace, args.output, meta=meta)
    for s in result.sources:
        what = "events" if s.trace is None else "spans+instants"
        print(f"  {s.kind:15} {s.count:8} {what:14} {s.path}{' (skipped: ' + s.skipped + ')' if s.skipped else ''}")
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"wrote {stats.path}: {stats.events} events, {stats.processes} processes (open in https://ui.perfetto.dev)")
    return 0
