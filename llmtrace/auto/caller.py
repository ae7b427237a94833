"""The program's function that called an instrumented library function, as a span attr
(`caller`): a C call that holds the GIL (Tensor.tolist, json.dumps) is never seen from
inside by the in-process sampler, and a coroutine waiting in asyncio.sleep is on no
thread's stack, so the span names who made it. Frames of the standard library and of
llmtrace (the call may go through multiprocessing, asyncio, json ...) are skipped; each
code object's label and verdict are cached. Materialising the frames still costs about a
microsecond, so only calls of at least SLOW_NS get a caller (`name_if_slow`): the ones a
finding can be about."""

from __future__ import annotations

import sys
from time import perf_counter_ns

from .. import names

SLOW_NS = 20_000  # only a call this long is worth naming its caller: finding the frame costs ~1 us
_labels: dict = {}  # code object -> 'module.qualname', or None for a library frame
_LIBRARY = frozenset(sys.stdlib_module_names) | {"llmtrace"}


def _qualified(frame) -> str:
    code = frame.f_code
    return f"{frame.f_globals.get('__name__', '?')}.{getattr(code, 'co_qualname', code.co_name)}"


def _label(frame) -> str | None:
    try:
        return _labels[frame.f_code]
    except KeyError:
        library = frame.f_globals.get("__name__", "?").split(".", 1)[0] in _LIBRARY
        label = _labels[frame.f_code] = None if library else _qualified(frame)
        return label


def caller(depth: int = 2, max_walk: int = 12) -> str:
    """The innermost frame above `depth` that is not the standard library's or llmtrace's
    ('module.qualname'); the frame at `depth` when none is found within max_walk."""
    frame = first = sys._getframe(depth)
    for _ in range(max_walk):
        if frame is None:
            break
        label = _label(frame)
        if label is not None:
            return label
        frame = frame.f_back
    return _qualified(first)


def name_if_slow(span, depth: int = 3) -> None:
    """Give `span` (open) its caller when the call has taken SLOW_NS so far; `depth` counts
    the frames from the wrapper that calls this to the instrumented call's caller."""
    if perf_counter_ns() - span.start_ns >= SLOW_NS:
        span.set(**{names.A_CALLER: caller(depth)})
