"""Chrome trace JSON (opens in ui.perfetto.dev and chrome://tracing), written as a stream.

    {"displayTimeUnit": "ns",
     "traceEvents": [metadata, spans, device spans, instants, counters, flows, foreign...],
     "otherData": {"llmtrace": {origin_ns, processes, tracks, events, meta, ...}}}

`ts`/`dur` are microseconds (3 decimals keep the nanoseconds) since `origin_ns`, the
earliest CLOCK_MONOTONIC time in the trace; each process's epoch offset is kept in
`otherData` so other tools' traces can be aligned. Ids (span, parent, link, flow) are
hex strings: they exceed 2**53. The first `events` entries of traceEvents are llmtrace's;
the rest are foreign events (other tools), shifted onto the same origin. Only keys that
Perfetto's JSON importer knows are used at the top level (it stops at unknown ones).

Flows use the v1 form (`ph: s` / `ph: f` with `bp: e`): it binds to whatever slice encloses
the flow event, so a span can start and end any number of flows, which v2's single
`bind_id` per slice cannot express.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

import orjson

from ..trace import Span, Trace
from .tracks import Layout, lay_out

FORMAT_VERSION = 1
FLOW_NAME = FLOW_CAT = "follows"
CHUNK_EVENTS = 1024  # events serialized per write


def hex_id(i: int) -> str:
    return f"{i:#x}"


@dataclass
class ExportStats:
    path: str
    events: int
    foreign_events: int
    flows: int
    processes: int
    bytes: int


class _EventWriter:
    """Writes `traceEvents` entries in chunks: one orjson call per chunk, bounded memory."""

    def __init__(self, f):
        self.f, self.buf, self.count = f, [], 0

    def add(self, ev: dict) -> None:
        self.buf.append(ev)
        if len(self.buf) >= CHUNK_EVENTS:
            self.flush()

    def flush(self) -> None:
        if not self.buf:
            return
        if self.count:
            self.f.write(b",")
        self.f.write(orjson.dumps(self.buf)[1:-1])
        self.count += len(self.buf)
        self.buf = []


def write_chrome_trace(trace: Trace, path: str, *, meta: dict | None = None) -> ExportStats:
    """Write `trace` to `path` (via a temporary file, so a failure leaves no partial file)."""
    path = os.fspath(path)
    origin = _origin_ns(trace)
    sources, first_follower = _link_sources(trace)

    def near(s: Span) -> int | None:  # where a flow should bind to s: near the follower's start
        return s.start_ns if s.link_id in sources else first_follower.get(s.span_id)

    layout = lay_out(trace, near)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(b'{"displayTimeUnit":"ns","traceEvents":[')
            w = _EventWriter(f)
            pids = _write_metadata(w, trace, layout)
            _write_spans(w, trace, layout, origin)
            _write_instants(w, trace, origin)
            _write_counters(w, trace, origin)
            flows = _write_flows(w, trace, sources, layout, origin)
            w.flush()
            ours = w.count
            _write_foreign(w, trace, origin)
            w.flush()
            other = {"llmtrace": _other_data(trace, layout, origin, ours, meta)}
            f.write(b'],"otherData":' + orjson.dumps(other, default=str, option=orjson.OPT_NON_STR_KEYS) + b"}")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return ExportStats(path, w.count, w.count - ours, flows, len(pids), os.path.getsize(path))


def _origin_ns(trace: Trace) -> int:
    """The earliest time in the trace: ts 0 of the export."""
    starts = [min((s.start_ns for s in trace.spans), default=None),
              min((s.device_start_ns for s in trace.spans if s.device_start_ns is not None), default=None),
              min((i.ts_ns for i in trace.instants), default=None),
              min((c.ts_ns for c in trace.counters), default=None),
              min((int(e["ts"] * 1000) for e in trace.foreign_events if _has_ts(e)), default=None)]
    return min((t for t in starts if t is not None), default=0)


def _has_ts(e: dict) -> bool:
    """A timed foreign event (metadata events carry a dummy ts of 0)."""
    return e.get("ph") != "M" and isinstance(e.get("ts"), (int, float))


def _us(ns: int) -> float:
    return ns / 1000


def _link_sources(trace: Trace) -> tuple[dict[int, Span], dict[int, int]]:
    """The spans that other spans link to (the sources of flow arrows), and by span id the
    start of the first span following each."""
    first: dict[int, int] = {}
    for s in trace.spans:
        if s.link_id and s.start_ns < first.get(s.link_id, s.start_ns + 1):
            first[s.link_id] = s.start_ns
    sources = {s.span_id: s for s in trace.spans if s.span_id in first}
    return sources, first


def _natural_key(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _write_metadata(w: _EventWriter, trace: Trace, layout: Layout) -> set[int]:
    """process/thread names and process order (master first, then agents by rank)."""
    names = {pid: p.name for pid, p in trace.processes.items()}
    threads: dict[tuple[int, int], str] = {}
    for pid, p in trace.processes.items():
        for tid, name in p.threads.items():
            threads[(pid, tid)] = name
    for s in trace.spans:
        names.setdefault(s.pid, f"pid {s.pid}")
    for e in (*trace.instants, *trace.counters):
        names.setdefault(e.pid, f"pid {e.pid}")
    for tid, track in layout.tracks.items():
        threads[(track.pid, tid)] = track.name
    order = sorted(names, key=lambda pid: (names[pid] != "master", _natural_key(names[pid]), pid))
    for index, pid in enumerate(order):
        w.add({"name": "process_name", "ph": "M", "ts": 0, "pid": pid, "tid": pid, "args": {"name": names[pid]}})
        w.add({"name": "process_sort_index", "ph": "M", "ts": 0, "pid": pid, "tid": pid,
               "args": {"sort_index": index}})
    for (pid, tid), name in threads.items():
        w.add({"name": "thread_name", "ph": "M", "ts": 0, "pid": pid, "tid": tid, "args": {"name": name}})
    return set(names)


def _span_args(s: Span) -> dict:
    args = {"stage": s.stage, "step": s.step, "span_id": hex_id(s.span_id), "parent_id": hex_id(s.parent_id),
            "link_id": hex_id(s.link_id), "failed": s.failed}
    if s.flags & ~1:
        args["flags"] = s.flags
    if s.attrs:
        args["attrs"] = s.attrs
    if s.device_start_ns is not None:
        args["device_ms"] = s.device_dur_ns / 1e6
    return args


def _write_spans(w: _EventWriter, trace: Trace, layout: Layout, origin: int) -> None:
    for s in trace.spans:
        w.add({"name": s.name, "cat": s.stage, "ph": "X", "ts": _us(s.start_ns - origin), "dur": _us(s.dur_ns),
               "pid": s.pid, "tid": layout.span_tid(s), "args": _span_args(s)})
    for s in trace.spans:
        if s.device_start_ns is None:
            continue
        w.add({"name": s.name, "cat": s.stage, "ph": "X", "ts": _us(s.device_start_ns - origin),
               "dur": _us(s.device_dur_ns), "pid": s.pid, "tid": layout.device_tid(s),
               "args": {"device": True, "span_id": hex_id(s.span_id), "step": s.step}})


def _write_instants(w: _EventWriter, trace: Trace, origin: int) -> None:
    for e in trace.instants:
        args = {"stage": e.stage, "step": e.step, "parent_id": hex_id(e.parent_id)}
        if e.attrs:
            args["attrs"] = e.attrs
        w.add({"name": e.name, "cat": e.stage, "ph": "i", "s": "t", "ts": _us(e.ts_ns - origin),
               "pid": e.pid, "tid": e.tid, "args": args})


def _write_counters(w: _EventWriter, trace: Trace, origin: int) -> None:
    """One track per counter name per process; numeric attributes become extra series of
    that track (a counter track cannot carry strings, so string attributes are left out)."""
    for c in trace.counters:
        args = {"value": c.value}
        for k, v in c.attrs.items():
            if isinstance(v, (int, float)) and k != "value":
                args[k] = v
        w.add({"name": c.name, "cat": "counter", "ph": "C", "ts": _us(c.ts_ns - origin), "pid": c.pid,
               "tid": c.pid, "args": args})


def _write_flows(w: _EventWriter, trace: Trace, sources: dict[int, Span], layout: Layout, origin: int) -> int:
    """A flow from each linked span to the span that follows it; the flow id is the latter's."""
    n = 0
    for dst in trace.spans:
        src = sources.get(dst.link_id)
        if src is None:
            continue
        fid = hex_id(dst.span_id)
        w.add({"name": FLOW_NAME, "cat": FLOW_CAT, "ph": "s", "id": fid,
               "ts": _us(layout.anchors[src.span_id] - origin), "pid": src.pid, "tid": layout.span_tid(src)})
        w.add({"name": FLOW_NAME, "cat": FLOW_CAT, "ph": "f", "bp": "e", "id": fid,
               "ts": _us(layout.anchors[dst.span_id] - origin), "pid": dst.pid, "tid": layout.span_tid(dst)})
        n += 1
    return n


def _write_foreign(w: _EventWriter, trace: Trace, origin: int) -> None:
    """Other tools' events are in µs on CLOCK_MONOTONIC; move them onto the export's origin."""
    shift = _us(origin)
    for e in trace.foreign_events:
        w.add({**e, "ts": e["ts"] - shift} if _has_ts(e) else e)


def _other_data(trace: Trace, layout: Layout, origin: int, ours: int, meta: dict | None) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "clock": "CLOCK_MONOTONIC",
        "origin_ns": origin,  # ts 0, in CLOCK_MONOTONIC ns; + epoch_offset_ns = Unix time
        "events": ours,  # traceEvents[:events] are llmtrace's, the rest foreign
        "processes": {pid: {"name": p.name, "epoch_offset_ns": p.epoch_offset_ns, "header": p.header,
                            "threads": p.threads, "dropped": p.dropped, "truncated_at": p.truncated_at,
                            "truncation_reason": p.truncation_reason, "source": p.source}
                      for pid, p in trace.processes.items()},
        "tracks": {tid: {"pid": t.pid, "tid": t.tid, "name": t.name} for tid, t in layout.tracks.items()},
        "meta": {**trace.meta, **(meta or {})},
    }
