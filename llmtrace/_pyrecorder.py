"""Pure-Python recorder: the reference implementation of the recorder backend.

`llmtrace._fastspan` (C) implements the same functions with the same semantics and
record layout; `recorder.py` picks the C one when it is built. Everything here runs
under the GIL: each thread appends to its own list, the flush thread drains a prefix
of it (`del lst[:n]` is atomic), so the hot path takes no lock.
"""

from __future__ import annotations

import contextvars
import itertools
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from time import perf_counter_ns
from types import TracebackType
from typing import Any, Literal, Protocol, TypeVar

from .spool_format import (
    ATTR_FLOAT,
    ATTR_STR,
    COUNTER,
    FLAG_ATTRS_CUT,
    FLAG_EXCEPTION,
    FLAG_OPEN_AT_STOP,
    INSTANT,
    N_ATTRS,
    RECORD,
    SPAN,
    float_bits,
)

BUFFER_CAP = 1 << 16  # records a thread may hold between two flushes

_enabled = False
_ids = itertools.count(1)
_id_base = os.getpid() << 40
# (span_id, step) of the innermost open span of this thread or asyncio task.
_current: contextvars.ContextVar[tuple[int, int]] = contextvars.ContextVar("llmtrace_current", default=(0, -1))
_strings: dict[str, int] = {}
_new_strings: list[tuple[int, str]] = []
_str_lock = threading.Lock()
_buffers: list[_Buffer] = []
_buffers_lock = threading.Lock()
_tls = threading.local()
_device_hook: DeviceHook | None = None
# Every open span of the process, any thread or task (close_open at a process's end); a
# dict, not a stack per thread: asyncio tasks interleave their spans on one thread.
_open: dict[int, LiveSpan] = {}


Record = tuple[int, ...]  # the fields of one spool record (spool_format.RECORD), in order
Carrier = Sequence[int]  # (trace_id, span_id, step): context.Carrier, or its wire form
R = TypeVar("R")
_NO_ATTRS = (0,) * N_ATTRS


class DeviceHook(Protocol):
    """Times a `device=True` span on the device (gpu.py): a token at enter, records at exit."""

    def begin(self) -> object: ...

    def end(self, token: object, span_id: int, name_id: int, stage_id: int, step: int) -> None: ...


class _Buffer:
    __slots__ = ("tid", "recs", "dropped", "reported")

    def __init__(self, tid: int):
        self.tid, self.dropped, self.reported = tid, 0, 0
        self.recs: list[Record] = []


def _buffer() -> _Buffer:
    try:
        buf: _Buffer = _tls.buf
        return buf
    except AttributeError:
        buf = _tls.buf = _Buffer(threading.get_native_id())
        with _buffers_lock:
            _buffers.append(buf)
        return buf


def intern(s: str) -> int:
    sid = _strings.get(s)
    if sid is None:
        with _str_lock:
            sid = _strings.get(s)
            if sid is None:
                sid = _strings[s] = len(_strings) + 1
                _new_strings.append((sid, s))
    return sid


def _stage_of(name: str) -> str:
    dot = name.find(".")
    return name if dot < 0 else name[:dot]


def _encode_attrs(attrs: Mapping[str, object]) -> tuple[list[int], list[int], int]:
    vals, keys, flags = [0] * N_ATTRS, [0] * N_ATTRS, 0
    for i, (k, v) in enumerate(attrs.items()):
        if i == N_ATTRS:
            flags |= FLAG_ATTRS_CUT
            break
        key = intern(k)
        if isinstance(v, bool) or isinstance(v, int) and -(1 << 63) <= v < (1 << 63):
            vals[i] = int(v)
        elif isinstance(v, float):
            vals[i], key = float_bits(v), key | ATTR_FLOAT
        else:
            vals[i], key = intern(v if isinstance(v, str) else str(v)), key | ATTR_STR
        keys[i] = key
    return vals, keys, flags


def _append(rec: Record) -> None:
    buf = _buffer()
    if len(buf.recs) < BUFFER_CAP:
        buf.recs.append(rec)
    else:
        buf.dropped += 1


def emit(
    kind: int,
    name_id: int,
    stage_id: int,
    start: int,
    end: int,
    span_id: int = 0,
    parent_id: int = 0,
    link_id: int = 0,
    step: int = -1,
    attrs: Mapping[str, object] | None = None,
    flags: int = 0,
    tid: int = 0,
) -> None:
    """Append one raw record (device timing, generator wrappers, stack samples).
    tid=0 means the calling thread; the stack sampler passes the sampled thread's id."""
    vals: Sequence[int]
    keys: Sequence[int]
    if attrs:
        vals, keys, f = _encode_attrs(attrs)
        flags |= f
    else:
        vals = keys = _NO_ATTRS
    _append(
        (
            start,
            end,
            span_id,
            parent_id,
            link_id,
            step,
            *vals,
            *keys,
            name_id,
            stage_id,
            tid or threading.get_native_id(),
            kind,
            flags,
            0,
        )
    )


class LiveSpan:
    """A timed region; use through `llmtrace.span(...)`."""

    __slots__ = (
        "name_id",
        "stage_id",
        "step",
        "link",
        "attrs",
        "device",
        "t0",
        "has_t0",
        "span_id",
        "parent",
        "token",
        "dtok",
        "tid",
        "reported",
    )
    # set by __enter__ (a span never entered is never exited with its id set)
    parent: int
    token: contextvars.Token[tuple[int, int]] | None
    dtok: object
    tid: int
    reported: bool

    def __init__(
        self,
        name: str,
        stage: str | None = None,
        step: int = -1,
        follows: Carrier | None = None,
        device: bool = False,
        attrs: dict[str, object] | None = None,
        start_ns: int | None = None,
    ):
        self.name_id = intern(name)
        self.stage_id = intern(stage if stage is not None else _stage_of(name))
        self.step, self.link, self.span_id = step, 0, 0
        self.has_t0, self.t0 = start_ns is not None, start_ns or 0
        self.attrs, self.device = attrs, device
        self._follow(follows)

    def _follow(self, carrier: Carrier | None) -> bool:
        """Link to `carrier`; a span without a step (none given, none inherited) takes its
        step. Returns whether it did."""
        if carrier is None:
            return False
        if len(carrier) != 3:
            raise ValueError("follows must be a (trace_id, span_id, step) carrier")
        self.link = int(carrier[1])
        adopt = self.step == -1
        if adopt:
            self.step = int(carrier[2])
        return adopt

    def follow(self, carrier: Carrier | None) -> None:
        """Link to the sender's span once its carrier is known; a span without a step, and
        the children opened in it from now on, take the carrier's step."""
        if self._follow(carrier) and self.span_id and _current.get()[0] == self.span_id:
            _current.set((self.span_id, self.step))  # __exit__ still resets to the token of __enter__

    @property
    def start_ns(self) -> int:
        return self.t0 if self.span_id or self.has_t0 else 0

    def __enter__(self) -> LiveSpan:
        if not _enabled:
            self.span_id = 0
            return self
        self.span_id = sid = _id_base | next(_ids)
        cur = _current.get()
        self.parent = cur[0]
        if self.step == -1:
            self.step = cur[1]
        self.token = _current.set((sid, self.step))
        self.dtok = _device_hook.begin() if self.device and _device_hook is not None else None
        self.tid, self.reported = _buffer().tid, False
        _open[id(self)] = self
        if not self.has_t0:
            self.t0 = perf_counter_ns()
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> Literal[False]:
        t1 = perf_counter_ns()
        if not self.span_id or self.token is None:
            return False
        if self.dtok is not None and _device_hook is not None:
            _device_hook.end(self.dtok, self.span_id, self.name_id, self.stage_id, self.step)
        _current.reset(self.token)
        _open.pop(id(self), None)
        if not self.reported:
            emit(
                SPAN,
                self.name_id,
                self.stage_id,
                self.t0,
                t1,
                self.span_id,
                self.parent,
                self.link,
                self.step,
                self.attrs,
                FLAG_EXCEPTION if et is not None else 0,
            )
        self.token = None
        return False

    def set(self, **attrs: object) -> None:
        """Add attributes known only inside the span (e.g. the batch size)."""
        self.attrs = {**(self.attrs or {}), **attrs}


def span(
    name: str,
    *,
    stage: str | None = None,
    step: int = -1,
    follows: Carrier | None = None,
    device: bool = False,
    start_ns: int | None = None,
    **attrs: object,
) -> LiveSpan:
    return LiveSpan(name, stage, step, follows, device, attrs or None, start_ns)


def instant(name: str, *, step: int = -1, **attrs: object) -> None:
    if _enabled:
        t = perf_counter_ns()
        cur = _current.get()
        emit(
            INSTANT,
            intern(name),
            intern(_stage_of(name)),
            t,
            t,
            0,
            cur[0],
            0,
            cur[1] if step == -1 else step,
            attrs or None,
        )


def counter(name: str, value: float, **attrs: object) -> None:
    if _enabled:
        t = perf_counter_ns()
        emit(COUNTER, intern(name), intern(_stage_of(name)), t, t, 0, 0, 0, -1, {"value": float(value), **attrs})


def traced(fn: Callable[..., R], name: str, stage: str) -> Callable[..., R]:
    """Wrap a plain (sync) function in a span; the C backend does this without a Python frame."""
    name_id, stage_id = intern(name), intern(stage)

    def wrapper(*args: Any, **kwargs: Any) -> R:
        if not _enabled:
            return fn(*args, **kwargs)
        s = LiveSpan.__new__(LiveSpan)
        s.name_id, s.stage_id, s.step, s.link, s.attrs, s.device = name_id, stage_id, -1, 0, None, False
        s.has_t0 = False
        with s:
            return fn(*args, **kwargs)

    return wrapper


def current() -> tuple[int, int]:
    """(span_id, step) of the innermost open span in this thread / task."""
    return _current.get()


def set_current(span_id: int, step: int) -> contextvars.Token[tuple[int, int]]:
    """Make `span_id` the current span; returns a token for `reset_current`."""
    return _current.set((span_id, step))


def reset_current(token: contextvars.Token[tuple[int, int]]) -> None:
    _current.reset(token)


def new_span_id() -> int:
    return _id_base | next(_ids)


def set_enabled(on: bool) -> None:
    global _enabled
    _enabled = bool(on)


def is_enabled() -> bool:
    return _enabled


def set_device_hook(hook: DeviceHook | None) -> None:
    global _device_hook
    _device_hook = hook


def drain() -> tuple[bytes, int, list[tuple[int, str]], dict[int, int]]:
    """Take everything recorded so far: (records bytes, n, new strings, {tid: dropped since last drain})."""
    with _str_lock:
        strings = _new_strings[:]
        del _new_strings[: len(strings)]
    with _buffers_lock:
        bufs = list(_buffers)
    out, n = bytearray(), 0
    dropped: dict[int, int] = {}
    pack = RECORD.pack
    for buf in bufs:
        recs = buf.recs
        k = len(recs)
        if k:
            out += b"".join([pack(*r) for r in recs[:k]])
            del recs[:k]
            n += k
        d = buf.dropped
        if d != buf.reported:
            dropped[buf.tid] = d - buf.reported
            buf.reported = d
    return bytes(out), n, strings, dropped


def requeue_strings() -> None:
    """Queue every interned string again, so that the next drain starts a self-contained spool file."""
    with _str_lock:
        _new_strings[:] = sorted((i, s) for s, i in _strings.items())


def close_open() -> int:
    """Record every open span as ending now, flagged FLAG_OPEN_AT_STOP: the last flush of a
    process that is going away (SIGTERM, exit with daemon threads mid-span). The spans go
    on; their own exit then records nothing. Returns how many were recorded."""
    t1, n = perf_counter_ns(), 0
    for s in list(_open.values()):
        if not s.reported:
            emit(
                SPAN,
                s.name_id,
                s.stage_id,
                s.t0,
                t1,
                s.span_id,
                s.parent,
                s.link,
                s.step,
                s.attrs,
                FLAG_OPEN_AT_STOP,
                tid=s.tid,
            )
            s.reported = True
            n += 1
    return n


def reset_after_fork() -> None:
    """In a forked child: forget the parent's records and strings, take a new id base;
    of the open spans only the forking thread's go on."""
    global _id_base, _tls, _ids, _buffers_lock, _str_lock
    here = _buffer().tid
    for key, s in list(_open.items()):
        if s.tid == here:
            s.tid = threading.get_native_id()
        else:
            del _open[key]
    _id_base = os.getpid() << 40
    _ids = itertools.count(1)
    _tls = threading.local()
    _buffers_lock, _str_lock = threading.Lock(), threading.Lock()  # may have been held at fork
    _buffers.clear()
    requeue_strings()
