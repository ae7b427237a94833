"""`load_trace(path)`: the one way the commands open a trace, whatever the user points at.

    run directory      RUN/spool/*.lts (the records; run meta from RUN/trace.json if there;
                       RUN/viztracer/, RUN/pyspy/ from `llmtrace record`), else RUN/trace.json
    spool directory    *.lts
    spool file         one process's PID.lts
    trace file         a Chrome trace JSON written by `llmtrace export`

Bad input raises `UserError` naming the file and the byte offset, never a traceback.
`drain_recorded()`: what this process recorded in memory (recording with no `out`).
"""

from __future__ import annotations

import os

from . import recorder
from .clock_align import align
from .errors import UserError
from .export.load_chrome import load_chrome_trace, read_export_info
from .spool_format import Batch, SpoolError
from .timeline import Process, RecordDecoder, Trace, load_spool_dir, load_spool_file, spool_files

TRACE_JSON = "trace.json"


def drain_recorded(process_name: str = "this process") -> Trace:
    """Everything this process has recorded in memory so far (no sink), decoded into a
    Trace; the records are consumed."""
    recorder.requeue_strings()
    records, n, strings, _ = recorder.drain()
    out = Trace()
    RecordDecoder(Process(os.getpid(), process_name)).add(Batch(strings, {}, memoryview(records), n), out)
    return out


def load_trace(path: str) -> Trace:
    if not os.path.exists(path):
        raise UserError(f"{path}: no such file or directory")
    try:
        if os.path.isdir(path):
            return _load_dir(path)
        if path.endswith(".lts"):
            trace = Trace()
            load_spool_file(path, trace)
            trace.sort()
            return trace
    except SpoolError as e:
        raise UserError(str(e)) from None
    except OSError as e:
        raise UserError(f"{e.filename or path}: cannot read: {e.strerror}") from None
    return load_chrome_trace(path)


def truncation_warnings(trace: Trace) -> list[str]:
    """One line per spool file that ends early (a crash, or corruption from some batch on):
    which file, where, why; the batches before that point were read."""
    return [
        f"warning: {p.source}: at byte {p.truncated_at}: {p.truncation_reason}; read what precedes it"
        for p in trace.processes.values()
        if p.truncated_at is not None
    ]


def _load_dir(path: str) -> Trace:
    trace_json = os.path.join(path, TRACE_JSON)
    if spool_files(path):
        from .integrations import attach_run_data

        trace = load_spool_dir(path)
        info = read_export_info(trace_json) if os.path.isfile(trace_json) else None
        if info is not None:
            trace.meta = info.get("meta") or {}
        align(trace)  # processes of other hosts onto one clock, before anything is fitted to it
        attach_run_data(path, trace)  # viztracer / py-spy data `llmtrace record` left beside the spool
        return trace
    if os.path.isfile(trace_json):
        return load_chrome_trace(trace_json)
    raise UserError(f"{path}: no trace here: expected spool files (*.lts, here or under spool/) or {TRACE_JSON}")
