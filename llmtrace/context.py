"""Trace context carried across processes.

A process puts `current()` (a small tuple: trace id, span id, step) into its own
messages; the receiver opens `llmtrace.span(..., follows=carrier)`, which records a
link that the export draws as a Perfetto flow arrow from sender to receiver.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from typing import NamedTuple

from . import recorder


def _trace_id_from_env() -> int:
    v = os.environ.get("LLMTRACE_TRACE_ID")
    if v:
        try:
            return int(v, 16)
        except ValueError:
            pass
    return random.getrandbits(63)


trace_id = _trace_id_from_env()


class Carrier(NamedTuple):
    """What crosses a process boundary; msgpack/JSON encode it as a 3-element list."""

    trace_id: int
    span_id: int
    step: int

    @classmethod
    def from_wire(cls, v: Sequence[int] | None) -> Carrier | None:
        if v is None:
            return None
        t, s, st = v
        return cls(int(t), int(s), int(st))


def current() -> Carrier:
    """The carrier for the innermost open span of this thread or asyncio task."""
    sid, step = recorder.current()
    return Carrier(trace_id, sid, step)


def set_trace_id(tid: int) -> None:
    global trace_id
    trace_id = tid
