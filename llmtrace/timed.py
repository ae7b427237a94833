"""Spans whose times are already known: `record_span(name, start_ns, end_ns, ...)`.

For work timed elsewhere (a request's time in a queue, from its arrival stamp to its
first schedule; a frame's decoding, known once the frame says whom it follows) and for
instrumentation that wraps a call and records afterwards. Times are
`time.perf_counter_ns()` values. Modelled on OpenTelemetry's explicit start/end times.
"""

from __future__ import annotations

from collections.abc import Sequence

from . import recorder
from .spool_format import FLAG_EXCEPTION, SPAN


def record_span(
    name: str,
    start_ns: int,
    end_ns: int,
    *,
    stage: str | None = None,
    step: int = -1,
    parent: int | None = None,
    follows: Sequence[int] | None = None,
    failed: bool = False,
    **attrs: object,
) -> int:
    """Record a finished span; returns its id (0 while recording is off).

    parent: the enclosing span's id (default: the current span of this thread or task);
    step: default the carrier's (`follows`), else the parent's when it is the current span.
    """
    if not recorder.is_enabled():
        return 0
    cur_id, cur_step = recorder.current()
    link = 0
    if follows is not None:
        link = int(follows[1])
        if step == -1:
            step = int(follows[2])
    if parent is None:
        parent = cur_id
        if step == -1:
            step = cur_step
    sid = recorder.new_span_id()
    recorder.emit(
        SPAN,
        recorder.intern(name),
        recorder.intern(stage or name.split(".", 1)[0]),
        int(start_ns),
        int(end_ns),
        sid,
        parent,
        link,
        step,
        attrs or None,
        FLAG_EXCEPTION if failed else 0,
    )
    return sid
