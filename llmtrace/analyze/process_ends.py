"""How the recorded processes ended, where that was not a clean exit: a child its parent
reaped with a non-zero code or a signal (`process.exit` instants, from automatic
instrumentation of multiprocessing and subprocess), a process stopped by a signal (with
the spans it still had open, recorded up to the stop and flagged), and a process whose
recording stops without the spool's closing mark (killed, crashed, or still running). A dead worker
explains a run's stall or its missing steps better than any stage breakdown.
"""

from __future__ import annotations

import signal
from collections import Counter

from .. import names
from ..timeline import Trace
from .report_schema import ProcessEnd


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def _extent(trace: Trace) -> tuple[int, dict[int, int]]:
    """The trace's first record time and each process's last one (ns)."""
    first: int | None = None
    last: dict[int, int] = {}
    rows = [(s.pid, s.start_ns, s.end_ns) for s in trace.spans]
    rows += [(r.pid, r.ts_ns, r.ts_ns) for group in (trace.instants, trace.counters, trace.samples) for r in group]
    for pid, start, end in rows:
        first = start if first is None or start < first else first
        if end > last.get(pid, 0):
            last[pid] = end
    return first or 0, last


def process_ends(trace: Trace) -> list[ProcessEnd]:
    """[{pid, name, how, exit_code?, at_s}]: the processes that did not end cleanly, `at_s`
    seconds after the trace's first record."""
    t0, last = _extent(trace)
    out, seen = [], set()
    for i in trace.instants:
        if i.name != names.I_PROCESS_EXIT:
            continue
        pid, code = i.attrs.get(names.A_CHILD_PID), i.attrs.get(names.A_EXIT_CODE)
        if not isinstance(code, int) or code == 0 or not isinstance(pid, int) or pid in seen:
            continue
        seen.add(pid)
        how = f"killed by {_signal_name(code)}" if code < 0 else f"exited with code {code}"
        out.append(_end(trace, pid, how, (i.ts_ns - t0) / 1e9, exit_code=code))
    open_spans = Counter(s.pid for s in trace.spans if s.open_at_stop)
    for pid, p in trace.processes.items():
        if pid in seen or pid not in last:
            continue
        reason = (p.closed or {}).get("reason")
        if reason is not None and reason != "exit":
            how = f"stopped by {reason}" + (
                f" with {open_spans[pid]} spans open (kept, ending there)" if open_spans[pid] else ""
            )
            out.append(_end(trace, pid, how, (last[pid] - t0) / 1e9))
        elif reason is None and any(q.closed for q in trace.processes.values()):  # a finished run
            out.append(
                _end(trace, pid, "stopped recording without closing it (killed or crashed)", (last[pid] - t0) / 1e9)
            )
    return out


def _end(trace: Trace, pid: int, how: str, at_s: float, exit_code: int | None = None) -> ProcessEnd:
    p = trace.processes.get(pid)
    end: ProcessEnd = {"pid": pid, "name": p.name if p else str(pid), "how": how, "at_s": round(at_s, 3)}
    if exit_code is not None:
        end["exit_code"] = exit_code
    return end


def describe(end: ProcessEnd) -> str:
    return f"process {end['name']} (pid {end['pid']}) {end['how']}, {end['at_s']:.2f} s into the run"
