"""Read a Chrome trace JSON written by `write_chrome_trace` back into a `Trace`, so a shared
trace.json can be analyzed without the run's spool files."""

from __future__ import annotations

import gzip

import orjson

from ..errors import UserError
from ..timeline import CounterSample, Instant, Process, Sample, Span, Trace
from . import foreign_events
from .chrome import FORMAT_VERSION, OTHER_DATA

TAIL_BYTES = 1 << 20


def read_json(path: str):
    """Parse a JSON file, gzip-compressed or not (torch.profiler writes .json.gz); a syntax
    error names the file and its byte offset."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
    except OSError as e:  # gzip.BadGzipFile included
        raise UserError(f"{path}: cannot read: {e.strerror or e}") from None
    except EOFError:
        raise UserError(f"{path}: cannot read: truncated gzip data") from None
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as e:
        # orjson reports a character position; the user's editor wants bytes.
        offset = len(data.decode("utf-8", "surrogateescape")[: e.pos].encode("utf-8", "surrogateescape"))
        raise UserError(f"{path}: at byte {offset}: malformed JSON: {e.msg}") from None


def load_chrome_trace(path: str) -> Trace:
    doc = read_json(path)
    info = doc.get("otherData", {}).get("llmtrace") if isinstance(doc, dict) else None
    if not isinstance(info, dict) or not isinstance(doc.get("traceEvents"), list):
        raise UserError(
            f"{path}: not a trace written by `llmtrace export` (no otherData.llmtrace); "
            "other tools' traces are combined with `llmtrace merge`"
        )
    if info.get("format_version") != FORMAT_VERSION:
        raise UserError(
            f"{path}: llmtrace trace format {info.get('format_version')}, this llmtrace reads format {FORMAT_VERSION}"
        )
    try:
        return _Loader(info).load(doc["traceEvents"], path)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise UserError(f"{path}: malformed otherData.llmtrace: {e!r}") from None


def read_export_info(path: str) -> dict | None:
    """`otherData.llmtrace` of an exported trace (run meta, processes, clock), read from the
    file's tail, where it is written last, without parsing the events. None if not there."""
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        f.seek(max(0, size - TAIL_BYTES))
        tail = f.read()
    i = tail.rfind(OTHER_DATA)
    if i < 0:
        return None
    try:
        other = orjson.loads(tail[i + len(OTHER_DATA) :].rstrip()[:-1])
    except orjson.JSONDecodeError:
        return None
    info = other.get("llmtrace") if isinstance(other, dict) else None
    return info if isinstance(info, dict) else None


class _Loader:
    def __init__(self, info: dict):
        self.origin = int(info["origin_ns"])
        self.ours = int(info["events"])
        # lane (synthetic track) -> the real thread it belongs to
        self.real_tid = {int(t): v["tid"] for t, v in info["tracks"].items() if v["tid"] is not None}
        self.trace = Trace(
            processes={int(pid): _process(int(pid), p) for pid, p in info["processes"].items()},
            meta=info.get("meta") or {},
        )
        self.stacks = [tuple(frames) for frames in info["stacks"]]
        self.device: list[tuple[int, int, int]] = []

    def load(self, events: list, path: str) -> Trace:
        handlers = {"X": self._complete, "i": self._instant, "C": self._counter}
        for n, ev in enumerate(events[: self.ours]):
            try:
                handler = handlers.get(ev["ph"])
                if handler is not None:
                    handler(ev)
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                raise UserError(f"{path}: traceEvents[{n}]: malformed event ({e!r}): {str(ev)[:200]}") from None
        shift = self.origin / 1000
        foreign = [e for e in events[self.ours :] if isinstance(e, dict)]
        used = set(self.trace.processes) | {e["pid"] for e in foreign if isinstance(e.get("pid"), int)}
        self.trace.foreign_events = [
            {**e, "ts": e["ts"] + shift} if e.get("ph") != "M" and isinstance(e.get("ts"), (int, float)) else e
            for e in foreign_events.normalize(foreign, used, "foreign")
        ]
        by_id = {s.span_id: s for s in self.trace.spans}
        for span_id, start, end in self.device:
            s = by_id.get(span_id)
            if s is not None:
                s.device_start_ns, s.device_end_ns = start, end
        self.trace.sort()
        return self.trace

    def _ns(self, us: float) -> int:
        return self.origin + round(us * 1000)

    def _complete(self, ev: dict) -> None:
        a = ev["args"]
        start = self._ns(ev["ts"])
        end = start + round(ev["dur"] * 1000)
        if a.get("device"):
            self.device.append((int(a["span_id"], 16), start, end))
            return
        flags = int(a.get("flags", 0)) | int(bool(a["failed"]))
        tid = self.real_tid.get(ev["tid"], ev["tid"])
        self.trace.spans.append(
            Span(
                ev["name"],
                a["stage"],
                ev["pid"],
                tid,
                start,
                end,
                int(a["span_id"], 16),
                int(a["parent_id"], 16),
                int(a["link_id"], 16),
                a["step"],
                a.get("attrs", {}),
                flags,
            )
        )

    def _instant(self, ev: dict) -> None:
        a = ev["args"]
        if "stage" not in a:  # a stack sample
            self.trace.samples.append(
                Sample(ev["pid"], ev["tid"], self._ns(ev["ts"]), self.stacks[a["stack"]], a["source"])
            )
            return
        self.trace.instants.append(
            Instant(
                ev["name"],
                a["stage"],
                ev["pid"],
                ev["tid"],
                self._ns(ev["ts"]),
                a["step"],
                int(a["parent_id"], 16),
                a.get("attrs", {}),
            )
        )

    def _counter(self, ev: dict) -> None:
        attrs = dict(ev["args"])
        value = float(attrs.pop("value"))
        self.trace.counters.append(CounterSample(ev["name"], ev["pid"], self._ns(ev["ts"]), value, attrs))


def _process(pid: int, p: dict) -> Process:
    return Process(
        pid,
        p["name"],
        p["header"],
        {int(t): n for t, n in p["threads"].items()},
        {int(t): n for t, n in p["dropped"].items()},
        p["truncated_at"],
        p["truncation_reason"],
        p["source"],
        p.get("closed"),
        p.get("cpu") or [],
    )
