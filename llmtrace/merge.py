"""One timeline from several Chrome traces: llmtrace exports, viztracer, py-spy
(chrometrace) and torch.profiler files, each moved onto host CLOCK_MONOTONIC.

Clocks, per kind:
  llmtrace         ts + otherData.llmtrace.origin_ns: CLOCK_MONOTONIC (loaded as a Trace)
  viztracer        ts is CLOCK_MONOTONIC µs already (viztracer_metadata.baseTimeNanoseconds
                   is its Unix - monotonic offset)
  torch.profiler   ts * 1000 + baseTimeNanoseconds is Unix time; minus the reference
                   Unix - monotonic offset (an llmtrace process's epoch_offset_ns, else
                   viztracer's, else this host's now)
  py-spy           µs since py-spy started; aligned when the file lies in an `llmtrace
                   record` run (pyspy/clock.json, beacon.json), else unknown
  other            unknown
A file with an unknown clock is placed so that its first event meets the timeline's start
(and `merge` says so). The first llmtrace input is the base: the others' spans join it;
everything else becomes its foreign events, so the result is an llmtrace trace again.

Processes: a pid of a foreign file that is an llmtrace process is that process (same
host, same time). Any other pid already used by an earlier input is renamed to a fresh
one, and each foreign process without a name gets "<kind>: <file>".
"""

from __future__ import annotations

import itertools
import os
import statistics
import time
from dataclasses import dataclass, field

from .clock_align import align
from .errors import UserError
from .export import foreign_events
from .export.load_chrome import load_chrome_trace, read_json
from .integrations import pyspy, torch_profiler
from .timeline import Trace

LLMTRACE, VIZTRACER, PYSPY, OTHER = "llmtrace", "viztracer", "py-spy", "chrome"
_ID_BITS = 40  # span ids are (pid << 40) | seq


@dataclass
class Source:
    path: str
    kind: str
    events: list[dict] = field(default_factory=list)
    trace: Trace | None = None
    epoch_base_ns: int | None = None  # Unix time = ts * 1000 + this (viztracer, torch.profiler)
    shift_us: float | None = None  # µs onto CLOCK_MONOTONIC; None: not known (yet)
    count: int = 0  # its spans and instants (llmtrace) or events, as read
    skipped: str = ""  # why its events were not added (a recording already holds them)

    def __post_init__(self):
        self.count = len(self.trace.spans) + len(self.trace.instants) if self.trace is not None else len(self.events)


@dataclass
class MergeResult:
    trace: Trace
    sources: list[Source]
    notes: list[str]


def load_source(path: str) -> Source:
    doc = read_json(path)
    if isinstance(doc, dict) and isinstance(doc.get("otherData"), dict) and "llmtrace" in doc["otherData"]:
        return Source(path, LLMTRACE, trace=load_chrome_trace(path))
    if isinstance(doc, dict) and "viztracer_metadata" in doc:
        base = doc["viztracer_metadata"].get("baseTimeNanoseconds")
        return Source(path, VIZTRACER, _event_list(doc, path), epoch_base_ns=base, shift_us=0.0)
    if torch_profiler.is_torch_trace(doc):
        return Source(
            path, torch_profiler.KIND, torch_profiler.events(doc), epoch_base_ns=torch_profiler.epoch_base_ns(doc)
        )
    events = _event_list(doc, path)
    if any(e.get("cat") == pyspy.SOURCE for e in events[:50]):
        return _pyspy_source(path, events)
    return Source(path, OTHER, events)


def _event_list(doc, path: str) -> list[dict]:
    events = doc.get("traceEvents") if isinstance(doc, dict) else doc
    if not isinstance(events, list):
        raise UserError(f"{path}: not a Chrome trace (expected a list of events or an object with traceEvents)")
    kept = [e for e in events if isinstance(e, dict)]
    if events and not kept:
        raise UserError(f"{path}: not a Chrome trace (its {len(events)} events are not objects)")
    return kept


def _pyspy_source(path: str, events: list[dict]) -> Source:
    """py-spy's pthread ids become native tids (its "thread (N)" frames); the clock is known
    when the file is an `llmtrace record` run's (clock.json, beacon.json beside it)."""
    threads = pyspy.stack_changes(events)
    native = pyspy.native_tids(events)
    moved = [{**e, "tid": native.get((e.get("pid"), e.get("tid")), e.get("tid"))} for e in events]
    d = os.path.dirname(os.path.abspath(path))
    clock_path, beacon_path = os.path.join(d, pyspy.CLOCK), os.path.join(d, pyspy.BEACON)
    if not os.path.isfile(clock_path):
        return Source(path, PYSPY, moved)
    beacon = read_json(beacon_path) if os.path.isfile(beacon_path) else None
    offset = pyspy.clock_offset_ns(threads, beacon, read_json(clock_path))
    return Source(path, PYSPY, moved, shift_us=offset / 1000)


def merge_files(paths: list[str]) -> MergeResult:
    sources = [load_source(p) for p in paths]
    notes: list[str] = []
    digests = [foreign_events.file_digest(p) for p in paths]
    for i, s in enumerate(sources):
        if digests[i] in digests[:i]:
            s.skipped = f"the same file as {paths[digests.index(digests[i])]}"
            notes.append(f"{s.path}: {s.skipped}; not added twice")
    embedded = {d for s in sources if s.trace is not None for d in s.trace.meta.get(foreign_events.EMBEDDED, ())}
    for s, digest in zip(sources, digests):
        if not s.skipped and s.trace is None and digest in embedded:
            s.skipped = "already in the llmtrace recording merged here"
            notes.append(f"{s.path}: {s.skipped}; not added twice")
    traces = [s for s in sources if s.trace is not None and not s.skipped]
    base = traces[0].trace if traces else Trace()
    used = _pids_of(base)
    for s in traces[1:]:
        _join_trace(base, s.trace, used)
    for d in align(base) or []:  # recordings from other hosts: onto one clock
        notes.append(
            f"{', '.join(d['processes'])}: another host's clock, aligned by {d['method']}"
            + (f" (+-{d['uncertainty_ns'] / 1e3:.0f} us)" if d["uncertainty_ns"] is not None else "")
        )
    ref_epoch = _reference_epoch_offset(base, sources)
    foreign = [s for s in sources if s.trace is None and not s.skipped]
    for s in foreign:
        if s.shift_us is None and s.epoch_base_ns is not None:
            s.shift_us = (s.epoch_base_ns - ref_epoch) / 1000
    start_us = _timeline_start_us(base, [s for s in foreign if s.shift_us is not None])
    known = set(base.processes)
    for s in sorted(foreign, key=lambda s: s.shift_us is None):
        if s.shift_us is None:
            first = min((float(e["ts"]) for e in s.events if _timed(e)), default=0.0)
            s.shift_us = (start_us if start_us is not None else first) - first
            notes.append(f"{s.path}: {s.kind} trace without clock information; placed at the timeline's start")
        base.foreign_events.extend(_moved_events(s, known, used))
    base.sort()
    return MergeResult(base, sources, notes)


def _timed(e: dict) -> bool:
    return e.get("ph") != "M" and isinstance(e.get("ts"), (int, float))


def _pids_of(trace: Trace) -> set[int]:
    pids = set(trace.processes)
    for group in (trace.spans, trace.instants, trace.counters, trace.samples):
        pids.update(r.pid for r in group)
    return pids


def _fresh_pid(used: set[int]) -> int:
    pid = next(p for p in itertools.count(max(used, default=0) + 1) if p not in used)
    used.add(pid)
    return pid


def _join_trace(base: Trace, other: Trace, used: set[int]) -> None:
    """Add another llmtrace trace's records; a pid already taken by a different process
    (another run) is renamed, with its span ids, so parents and flows stay intact."""
    rename = {}
    for pid, proc in other.processes.items():
        mine = base.processes.get(pid)
        if mine is not None and mine.header.get("trace_id") == proc.header.get("trace_id"):
            continue
        if pid in used:
            rename[pid] = _fresh_pid(used)
        used.add(rename.get(pid, pid))
    for pid, proc in other.processes.items():
        proc.pid = rename.get(pid, pid)
        base.processes.setdefault(proc.pid, proc)
    for s in other.spans:
        if s.pid in rename:
            s.span_id, s.parent_id, s.link_id = (_renamed_id(i, rename) for i in (s.span_id, s.parent_id, s.link_id))
    for group in (other.spans, other.instants, other.counters, other.samples):
        for r in group:
            r.pid = rename.get(r.pid, r.pid)
    base.spans += other.spans
    base.instants += other.instants
    base.counters += other.counters
    base.samples += other.samples
    base.foreign_events += [{**e, "pid": rename.get(e.get("pid"), e.get("pid"))} for e in other.foreign_events]


def _renamed_id(i: int, rename: dict[int, int]) -> int:
    pid = i >> _ID_BITS
    return (rename[pid] << _ID_BITS) | (i & ((1 << _ID_BITS) - 1)) if pid in rename else i


def _reference_epoch_offset(base: Trace, sources: list[Source]) -> int:
    """Unix - CLOCK_MONOTONIC ns: from the llmtrace processes, else viztracer, else now."""
    offsets = [p.epoch_offset_ns for p in base.processes.values() if p.epoch_offset_ns]
    if offsets:
        return int(statistics.median(offsets))
    for s in sources:
        if s.kind == VIZTRACER and s.epoch_base_ns:
            return int(s.epoch_base_ns)
    return time.time_ns() - time.perf_counter_ns()


def _timeline_start_us(base: Trace, aligned: list[Source]) -> float | None:
    """The earliest CLOCK_MONOTONIC µs of the records and the aligned sources' events."""
    starts = [r.start_ns / 1000 for r in base.spans[:1]] + [r.ts_ns / 1000 for r in base.instants[:1]]
    starts += [float(e["ts"]) for e in base.foreign_events if _timed(e)]
    starts += [float(e["ts"]) + s.shift_us for s in aligned for e in s.events if _timed(e)]
    return min(starts) if starts else None


def _moved_events(s: Source, known: set[int], used: set[int]) -> list[dict]:
    """The source's events on CLOCK_MONOTONIC µs, pids renamed apart, processes named."""
    label = os.path.basename(s.path)
    own = {e["pid"] for e in s.events if isinstance(e.get("pid"), int)}
    events = foreign_events.normalize(s.events, used | own | known, f"{s.kind}: {label}")
    pids = {int(e["pid"]) for e in events if isinstance(e.get("pid"), int)}
    rename = {}
    for pid in sorted(pids):
        if pid in known:
            continue
        rename[pid] = _fresh_pid(used) if pid in used else pid
        used.add(rename[pid])
    named = {rename.get(e["pid"], e["pid"]) for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    out = []
    for e in events:
        pid = e.get("pid")
        if e.get("ph") == "M" and e.get("name") == "process_name" and pid in known:
            continue  # llmtrace names its own processes
        ev = dict(e)
        if pid in rename:
            ev["pid"] = rename[pid]
        if _timed(e):
            ev["ts"] = float(e["ts"]) + s.shift_us
        out.append(ev)
    for old, new in sorted(rename.items()):
        if new not in named:
            suffix = f" (pid {old})" if old != new else ""
            out.append(
                {
                    "ph": "M",
                    "name": "process_name",
                    "pid": new,
                    "tid": 0,
                    "args": {"name": f"{s.kind}: {label}{suffix}"},
                }
            )
    return out
