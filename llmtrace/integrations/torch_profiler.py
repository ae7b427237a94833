"""torch.profiler (Kineto) Chrome traces: recognizing them and their clock, for `llmtrace merge`.

Kineto writes `ts` in µs with `baseTimeNanoseconds` beside the events (torch >= 2.4):
Unix time of an event = ts * 1000 + baseTimeNanoseconds (older torch wrote absolute Unix
µs, i.e. a base of 0). `displayTimeUnit` only tells viewers how to show times. CPU events
carry the OS pid/tid; device tracks use small pids (the device index), which `merge`
renames apart from real processes.
"""

from __future__ import annotations

KIND = "torch.profiler"
_MARKS = ("baseTimeNanoseconds", "deviceProperties", "schemaVersion", "traceName")


def is_torch_trace(doc) -> bool:
    return isinstance(doc, dict) and isinstance(doc.get("traceEvents"), list) and any(k in doc for k in _MARKS)


def epoch_base_ns(doc: dict) -> int:
    """ns to add to `ts * 1000` for Unix time."""
    return int(doc.get("baseTimeNanoseconds") or 0)


def events(doc: dict) -> list[dict]:
    return [e for e in doc["traceEvents"] if isinstance(e, dict)]
