"""Chrome trace JSON (opens in ui.perfetto.dev and chrome://tracing), written as a stream.

    {"displayTimeUnit": "ns",
     "traceEvents": [metadata, spans, device spans, instants, counters, flows, stack samples,
                     foreign...],
     "otherData": {"llmtrace": {origin_ns, processes, tracks, stacks, events, meta, ...}}}

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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import chain
from operator import attrgetter

import orjson

from ..timeline import Span, Trace
from .tracks import Layout, in_order, lay_out

FORMAT_VERSION = 1
FLOW_NAME = FLOW_CAT = "follows"
CHUNK_EVENTS = 1024  # events serialized per write
OTHER_DATA = b'],"otherData":'  # what follows the events; read back from the file's tail


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

    def extend(self, events: Iterable[dict]) -> None:
        buf = self.buf
        for ev in events:
            buf.append(ev)
            if len(buf) >= CHUNK_EVENTS:
                self.flush()
                buf = self.buf

    def flush(self) -> None:
        if not self.buf:
            return
        if self.count:
            self.f.write(b",")
        self.f.write(orjson.dumps(self.buf, default=str)[1:-1])
        self.count += len(self.buf)
        self.buf = []


def write_chrome_trace(trace: Trace, path: str, *, meta: dict | None = None) -> ExportStats:
    """Write `trace` to `path` (via a temporary file, so a failure leaves no partial file)."""
    path = os.fspath(path)
    origin = _origin_ns(trace)
    sources = _link_sources(trace)
    layout = lay_out(trace, lambda s: s.span_id in sources or s.link_id in sources)
    names = _process_names(trace)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(b'{"displayTimeUnit":"ns","traceEvents":[')
            w = _EventWriter(f)
            w.extend(_metadata_events(trace, names, layout))
            w.extend(_span_events(trace, layout, origin))
            w.extend(_device_events(trace, layout, origin))
            w.extend(_instant_events(trace, origin))
            w.extend(_counter_events(trace, origin))
            w.extend(_flow_events(trace, sources, layout, origin))
            stacks: dict[tuple[str, ...], int] = {}
            w.extend(_sample_events(trace, origin, stacks))
            w.flush()
            ours = w.count
            w.extend(_foreign_events(trace, origin))
            w.flush()
            other = {"llmtrace": _other_data(trace, layout, origin, ours, stacks, meta)}
            f.write(OTHER_DATA + orjson.dumps(other, default=str, option=orjson.OPT_NON_STR_KEYS) + b"}")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    flows = sum(1 for s in trace.spans if s.link_id in sources)
    return ExportStats(path, w.count, w.count - ours, flows, len(names), os.path.getsize(path))


def _origin_ns(trace: Trace) -> int:
    """The earliest time in the trace: ts 0 of the export."""
    starts = [
        min((s.start_ns for s in trace.spans), default=None),
        min((s.device_start_ns for s in trace.spans if s.device_start_ns is not None), default=None),
        min((i.ts_ns for i in trace.instants), default=None),
        min((c.ts_ns for c in trace.counters), default=None),
        min((smp.ts_ns for smp in trace.samples), default=None),
        min((int(e["ts"] * 1000) for e in trace.foreign_events if _has_ts(e)), default=None),
    ]
    return min((t for t in starts if t is not None), default=0)


def _has_ts(e: dict) -> bool:
    """A timed foreign event (metadata events carry a dummy ts of 0)."""
    return e.get("ph") != "M" and isinstance(e.get("ts"), (int, float))


def _us(ns: int) -> float:
    return ns / 1000


def _link_sources(trace: Trace) -> dict[int, Span]:
    """The spans that other spans link to (follow): the sources of flow arrows."""
    targets = {s.link_id for s in trace.spans if s.link_id}
    return {s.span_id: s for s in trace.spans if s.span_id in targets}


def _natural_key(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _process_names(trace: Trace) -> dict[int, str]:
    """Every pid that has events, named (a process without a spool header gets "pid N")."""
    names = {pid: p.name for pid, p in trace.processes.items()}
    for e in chain(trace.spans, trace.instants, trace.counters, trace.samples):
        if e.pid not in names:
            names[e.pid] = f"pid {e.pid}"
    return names


def _metadata_events(trace: Trace, names: dict[int, str], layout: Layout) -> Iterator[dict]:
    """Process and thread names, and the process order: master first, then agents by rank."""
    order = sorted(names, key=lambda pid: (names[pid] != "master", _natural_key(names[pid]), pid))
    for index, pid in enumerate(order):
        yield {"name": "process_name", "ph": "M", "ts": 0, "pid": pid, "tid": pid, "args": {"name": names[pid]}}
        yield {"name": "process_sort_index", "ph": "M", "ts": 0, "pid": pid, "tid": pid, "args": {"sort_index": index}}
    for pid, p in trace.processes.items():
        for tid, name in p.threads.items():
            yield {"name": "thread_name", "ph": "M", "ts": 0, "pid": pid, "tid": tid, "args": {"name": name}}
    for tid, track in layout.tracks.items():
        yield {"name": "thread_name", "ph": "M", "ts": 0, "pid": track.pid, "tid": tid, "args": {"name": track.name}}


def _parents_first(spans: list[Span]) -> list[Span]:
    """Spans by start, the longer first among equal starts: viewers nest complete events in
    file order, so a parent must come before a child that starts with it."""
    start_of, end_of = attrgetter("start_ns"), attrgetter("end_ns")
    if in_order(spans, start_of, end_of):
        return spans
    ordered = sorted(spans, key=end_of, reverse=True)
    ordered.sort(key=start_of)  # stable: equal starts stay longest first
    return ordered


def _span_events(trace: Trace, layout: Layout, origin: int) -> Iterator[dict]:
    moved = layout.moved  # hot loop: hex_id, _us and span_tid are inlined
    for s in _parents_first(trace.spans):
        args = {
            "stage": s.stage,
            "step": s.step,
            "span_id": f"{s.span_id:#x}",
            "parent_id": f"{s.parent_id:#x}",
            "link_id": f"{s.link_id:#x}",
            "failed": bool(s.flags & 1),
        }
        if s.flags & ~1:
            args["flags"] = s.flags
        if s.attrs:
            args["attrs"] = s.attrs
        if s.device_start_ns is not None:
            args["device_ms"] = (s.device_end_ns - s.device_start_ns) / 1e6
        yield {
            "name": s.name,
            "cat": s.stage,
            "ph": "X",
            "ts": (s.start_ns - origin) / 1000,
            "dur": (s.end_ns - s.start_ns) / 1000,
            "pid": s.pid,
            "tid": moved.get(s.span_id, s.tid),
            "args": args,
        }


def _device_events(trace: Trace, layout: Layout, origin: int) -> Iterator[dict]:
    """Device execution of each span timed with CUDA events, on its process's device track."""
    for s in trace.spans:
        if s.device_start_ns is not None:
            yield {
                "name": s.name,
                "cat": s.stage,
                "ph": "X",
                "ts": _us(s.device_start_ns - origin),
                "dur": _us(s.device_dur_ns),
                "pid": s.pid,
                "tid": layout.device_tid(s),
                "args": {"device": True, "span_id": hex_id(s.span_id), "step": s.step},
            }


def _instant_events(trace: Trace, origin: int) -> Iterator[dict]:
    for e in trace.instants:
        args = {"stage": e.stage, "step": e.step, "parent_id": hex_id(e.parent_id)}
        if e.attrs:
            args["attrs"] = e.attrs
        yield {
            "name": e.name,
            "cat": e.stage,
            "ph": "i",
            "s": "t",
            "ts": _us(e.ts_ns - origin),
            "pid": e.pid,
            "tid": e.tid,
            "args": args,
        }


def _counter_events(trace: Trace, origin: int) -> Iterator[dict]:
    """One track per counter name per process; numeric attributes become extra series of
    that track (a counter track cannot carry strings, so string attributes are left out)."""
    for c in trace.counters:
        args = {"value": c.value}
        for k, v in c.attrs.items():
            if isinstance(v, (int, float)) and k != "value":
                args[k] = v
        yield {
            "name": c.name,
            "cat": "counter",
            "ph": "C",
            "ts": _us(c.ts_ns - origin),
            "pid": c.pid,
            "tid": c.pid,
            "args": args,
        }


def _flow_events(trace: Trace, sources: dict[int, Span], layout: Layout, origin: int) -> Iterator[dict]:
    """A flow from each linked span to the span that follows it; the flow id is the latter's."""
    for dst in trace.spans:
        src = sources.get(dst.link_id)
        if src is None:
            continue
        fid = hex_id(dst.span_id)
        yield {
            "name": FLOW_NAME,
            "cat": FLOW_CAT,
            "ph": "s",
            "id": fid,
            "ts": _us(layout.anchors[src.span_id] - origin),
            "pid": src.pid,
            "tid": layout.span_tid(src),
        }
        yield {
            "name": FLOW_NAME,
            "cat": FLOW_CAT,
            "ph": "f",
            "bp": "e",
            "id": fid,
            "ts": _us(layout.anchors[dst.span_id] - origin),
            "pid": dst.pid,
            "tid": layout.span_tid(dst),
        }


def _sample_events(trace: Trace, origin: int, stacks: dict[tuple[str, ...], int]) -> Iterator[dict]:
    """Stack samples as instants named by their innermost frame. Each distinct stack is
    numbered in `stacks` (written once, into otherData) and referenced by its number."""
    for smp in trace.samples:
        n = stacks.setdefault(smp.stack, len(stacks))
        yield {
            "name": smp.stack[-1] if smp.stack else "?",
            "cat": "sample",
            "ph": "i",
            "s": "t",
            "ts": _us(smp.ts_ns - origin),
            "pid": smp.pid,
            "tid": smp.tid,
            "args": {"stack": n, "source": smp.source},
        }


def _foreign_events(trace: Trace, origin: int) -> Iterator[dict]:
    """Other tools' events are in µs on CLOCK_MONOTONIC; move them onto the export's origin."""
    shift = _us(origin)
    for e in trace.foreign_events:
        yield {**e, "ts": e["ts"] - shift} if _has_ts(e) else e


def _other_data(
    trace: Trace, layout: Layout, origin: int, ours: int, stacks: dict[tuple[str, ...], int], meta: dict | None
) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "clock": "CLOCK_MONOTONIC",
        "origin_ns": origin,  # ts 0, in CLOCK_MONOTONIC ns; + epoch_offset_ns = Unix time
        "events": ours,  # traceEvents[:events] are llmtrace's, the rest foreign
        "processes": {
            pid: {
                "name": p.name,
                "epoch_offset_ns": p.epoch_offset_ns,
                "header": p.header,
                "threads": p.threads,
                "dropped": p.dropped,
                "truncated_at": p.truncated_at,
                "truncation_reason": p.truncation_reason,
                "source": p.source,
                "closed": p.closed,
                "cpu": p.cpu,
            }
            for pid, p in trace.processes.items()
        },
        "tracks": {tid: {"pid": t.pid, "tid": t.tid, "name": t.name} for tid, t in layout.tracks.items()},
        "stacks": list(stacks),  # stack samples' frames (outermost first), by number
        "meta": {**trace.meta, **(meta or {})},
    }
