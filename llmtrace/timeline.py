"""The in-memory timeline: records of every process of a run, loaded into one `Trace`.

Times are host CLOCK_MONOTONIC nanoseconds (shared by all processes of a host). A span
with device timing carries `device_start_ns`/`device_end_ns` on the same clock.
"""

from __future__ import annotations

import glob
import itertools
import os
from dataclasses import dataclass, field

from .cpu_time import CPU_KEY
from .names import I_DEVICE_BUSY
from .spool_format import (
    ATTR_FLOAT,
    ATTR_ID_MASK,
    ATTR_STR,
    CLOSED,
    COUNTER,
    DEVICE,
    FLAG_EXCEPTION,
    FLAG_OPEN_AT_STOP,
    INSTANT,
    RECORD,
    SAMPLE,
    SPAN,
    Batch,
    SpoolError,
    bits_float,
    read_spool,
)


@dataclass(slots=True)
class Span:
    name: str
    stage: str
    pid: int
    tid: int
    start_ns: int
    end_ns: int
    span_id: int
    parent_id: int = 0
    link_id: int = 0
    step: int = -1
    attrs: dict = field(default_factory=dict)
    flags: int = 0
    device_start_ns: int | None = None
    device_end_ns: int | None = None

    @property
    def dur_ns(self) -> int:
        return self.end_ns - self.start_ns

    @property
    def device_dur_ns(self) -> int | None:
        if self.device_start_ns is None:
            return None
        return self.device_end_ns - self.device_start_ns

    @property
    def failed(self) -> bool:
        return bool(self.flags & FLAG_EXCEPTION)

    @property
    def open_at_stop(self) -> bool:
        """Still open when its process stopped recording: its end is that stop, not its own."""
        return bool(self.flags & FLAG_OPEN_AT_STOP)


@dataclass(slots=True)
class Instant:
    name: str
    stage: str
    pid: int
    tid: int
    ts_ns: int
    step: int = -1
    parent_id: int = 0
    attrs: dict = field(default_factory=dict)


@dataclass(slots=True)
class CounterSample:
    name: str
    pid: int
    ts_ns: int
    value: float
    attrs: dict = field(default_factory=dict)


@dataclass(slots=True)
class Sample:
    """One stack sample (in-process sampler or py-spy): frames outermost first."""

    pid: int
    tid: int
    ts_ns: int
    stack: tuple[str, ...]
    source: str = "llmtrace"


@dataclass
class Process:
    pid: int
    name: str
    header: dict = field(default_factory=dict)
    threads: dict[int, str] = field(default_factory=dict)
    dropped: dict[int, int] = field(default_factory=dict)
    truncated_at: int | None = None
    truncation_reason: str = ""
    source: str = ""
    closed: dict | None = None  # {"reason", "ns"} when the recording ended cleanly (spool_format.CLOSED)
    cpu: list[dict] = field(default_factory=list)  # per-thread CPU counters over time (llmtrace/cpu_time.py)

    @property
    def epoch_offset_ns(self) -> int:
        return int(self.header.get("epoch_offset_ns", 0))

    @property
    def span_cost_ns(self) -> float:
        return float(self.header.get("span_cost_ns", 0.0))

    @property
    def resource(self) -> dict:
        """What the process said of itself with `llmtrace.configure(resource=...)`."""
        return self.header.get("resource") or {}


@dataclass
class Trace:
    processes: dict[int, Process] = field(default_factory=dict)
    spans: list[Span] = field(default_factory=list)
    instants: list[Instant] = field(default_factory=list)
    counters: list[CounterSample] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    # Chrome-trace events from other tools (viztracer, py-spy, torch.profiler), already on our clock.
    foreign_events: list[dict] = field(default_factory=list)
    # Extra run information written by `llmtrace run` (config, workload results).
    meta: dict = field(default_factory=dict)

    def sort(self) -> None:
        self.spans.sort(key=lambda s: s.start_ns)
        self.instants.sort(key=lambda i: i.ts_ns)
        self.counters.sort(key=lambda c: c.ts_ns)
        self.samples.sort(key=lambda s: s.ts_ns)

    @property
    def spans_dropped(self) -> int:
        return sum(sum(p.dropped.values()) for p in self.processes.values())


def _decode_attrs(vals, keys, strings) -> dict:
    out = {}
    for v, k in zip(vals, keys):
        if not k:
            continue
        name = strings.get(k & ATTR_ID_MASK, "?")
        if k & ATTR_STR:
            out[name] = strings.get(v, "?")
        elif k & ATTR_FLOAT:
            out[name] = bits_float(v)
        else:
            out[name] = v
    return out


class RecordDecoder:
    """Turns one process's batches into spans, instants, counters and samples, batch by
    batch: `load_spool_file` feeds it a whole file, the TUI's live feed each new batch.

    A span's device time (a DEVICE record) arrives after the span, usually a step later,
    and its busy time (a `device.busy` instant, device_activity.py) once its window is read;
    `keep_ids` bounds how many recent spans stay joinable (None: all, for a whole file).
    """

    def __init__(self, proc: Process, keep_ids: int | None = None):
        self.proc = proc
        self.strings: dict[int, str] = {}
        self.keep_ids = keep_ids
        self._by_id: dict[int, Span] = {}
        self._device: dict[int, tuple[int, int]] = {}  # device times whose span is not seen yet
        self._stacks: dict[int, tuple[str, ...]] = {}

    def add(self, b: Batch, out: Trace) -> None:
        """Decode batch `b`, appending its records to `out`'s lists."""
        proc, pid, strings = self.proc, self.proc.pid, self.strings
        strings.update(b.strings)
        if "process_name" in b.meta:
            proc.name = b.meta["process_name"]
        if "resource" in b.meta:
            proc.header.setdefault("resource", {}).update(b.meta["resource"])
        for tid, name in b.meta.get("threads", {}).items():
            proc.threads[int(tid)] = name
        for tid, n in b.meta.get("dropped", {}).items():
            proc.dropped[int(tid)] = proc.dropped.get(int(tid), 0) + int(n)
        if CLOSED in b.meta:
            proc.closed = b.meta[CLOSED]
        if CPU_KEY in b.meta:
            proc.cpu.append(b.meta[CPU_KEY])
        by_id, device = self._by_id, self._device
        for r in RECORD.iter_unpack(b.records):
            (
                start,
                end,
                span_id,
                parent,
                link,
                step,
                a0,
                a1,
                a2,
                a3,
                k0,
                k1,
                k2,
                k3,
                name_id,
                stage_id,
                tid,
                kind,
                flags,
                _,
            ) = r
            if kind == DEVICE:
                s = by_id.get(span_id)
                if s is None:
                    device[span_id] = (start, end)
                else:
                    s.device_start_ns, s.device_end_ns = start, end
                continue
            if kind == SAMPLE:
                stack = self._stacks.get(name_id)
                if stack is None:
                    stack = self._stacks[name_id] = tuple(strings.get(name_id, "?").split(";"))
                out.samples.append(Sample(pid, tid, start, stack))
                continue
            name, stage = strings.get(name_id, "?"), strings.get(stage_id, "?")
            attrs = _decode_attrs((a0, a1, a2, a3), (k0, k1, k2, k3), strings) if (k0 | k1 | k2 | k3) else {}
            if kind == SPAN:
                s = Span(name, stage, pid, tid, start, end, span_id, parent, link, step, attrs, flags)
                out.spans.append(s)
                by_id[span_id] = s
                if device:
                    d = device.pop(span_id, None)
                    if d is not None:
                        s.device_start_ns, s.device_end_ns = d
            elif kind == INSTANT and name == I_DEVICE_BUSY:
                s = by_id.get(parent)  # written when the activity window is read, after its span
                if s is not None:
                    s.attrs.update(attrs)
            elif kind == INSTANT:
                out.instants.append(Instant(name, stage, pid, tid, start, step, parent, attrs))
            elif kind == COUNTER:
                value = attrs.pop("value", 0.0)
                out.counters.append(CounterSample(name, pid, start, value, attrs))
        if self.keep_ids is not None:
            self._forget_old()

    def _forget_old(self) -> None:
        """Keep the newest `keep_ids` spans (and pending device times) joinable."""
        for d in (self._by_id, self._device):
            if len(d) > self.keep_ids:
                for k in list(itertools.islice(d, len(d) - self.keep_ids)):
                    del d[k]


def load_spool_file(path: str, trace: Trace) -> Process:
    """Add one process's spool file to `trace`."""
    sf = read_spool(path)
    h = sf.header
    proc = Process(
        int(h.get("pid", 0)),
        h.get("process_name", str(h.get("pid", 0))),
        h,
        truncated_at=sf.truncated_at,
        truncation_reason=sf.truncation_reason,
        source=path,
    )
    decoder = RecordDecoder(proc)
    for b in sf.batches:
        decoder.add(b, trace)
    trace.processes[proc.pid] = proc
    return proc


def spool_files(path: str) -> list[str]:
    d = os.path.join(path, "spool") if os.path.isdir(os.path.join(path, "spool")) else path
    return sorted(glob.glob(os.path.join(d, "*.lts")))


def load_spool_dir(path: str) -> Trace:
    files = spool_files(path)
    if not files:
        raise SpoolError(path, 0, "no spool files (*.lts) here or under spool/")
    trace = Trace()
    for f in files:
        load_spool_file(f, trace)
    trace.sort()
    return trace
