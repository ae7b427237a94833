"""Stacks read without the GIL (llmtrace._frames), named under it.

`_frames.snapshot` sleeps with the GIL released, then copies every thread's frame chain as
addresses (code object, instruction offset, globals), so a thread running pure Python is
seen where it is, not at its next release of the GIL. This module turns those addresses
into the sampler's labels ('module:qualname:line', outermost first). A code object or a
globals dict is taken from its address only once `_frames.object_at` has checked that a
live object of that type is there, and is held from then on (so the address cannot come
to name another object); a stack whose code object was freed before it could be named is
dropped (one tick of one thread).
"""

from __future__ import annotations

import struct
import threading
from types import CodeType
from typing import Any

FRAME = struct.Struct("QqQ")  # code address, instruction offset in bytes, globals address
MAX_KNOWN = 1 << 16  # distinct stacks / frames remembered before the tables start over


def reader() -> Any | None:
    """The `_frames` module when it works in this process (CPython 3.11/3.12 on Linux,
    built), else None."""
    try:
        from . import _frames  # type: ignore[attr-defined]
    except ImportError:
        return None
    return _frames if _frames.available() else None


class NativeStacks:
    def __init__(self, frames: Any):
        self.frames = frames
        self._codes: dict[int, CodeType] = {}  # address -> code object, held
        self._globals: dict[int, dict[str, object]] = {}  # address -> a frame's globals, held
        self._modules: dict[int, str] = {}  # code address -> its frames' module
        self._frame_labels: dict[bytes, str] = {}
        self._stacks: dict[bytes, tuple[str, ...]] = {}
        self._skip: tuple[int, ...] = ()
        self._ticks = 0

    def snapshot(
        self, sleep_s: float, max_depth: int, skip_names: tuple[str, ...]
    ) -> tuple[int, list[tuple[int, bytes]]]:
        """(t_ns, [(native tid, raw stack)]) after sleeping `sleep_s` (llmtrace's own
        threads, by name, left out)."""
        if self._ticks % 64 == 0:  # threads come and go; their names rarely matter sooner
            self._skip = tuple(t.native_id for t in threading.enumerate() if t.name in skip_names and t.native_id)
        self._ticks += 1
        t_ns, rows = self.frames.snapshot(int(sleep_s * 1e9), max_depth, self._skip)
        return t_ns, rows

    def labels(self, raw: bytes) -> tuple[str, ...] | None:
        """One thread's raw stack as labels, outermost first; None when a frame's code object
        is gone (it returned and was freed before this tick could name it)."""
        stack = self._stacks.get(raw)
        if stack is not None:
            return stack
        out = []
        for i in range(len(raw) - FRAME.size, -1, -FRAME.size):  # innermost first in `raw`
            key = raw[i : i + FRAME.size]
            label = self._frame_labels.get(key) or self._label(key)  # naming one may clear the tables
            if label is None:
                return None
            out.append(label)
        if len(self._stacks) > MAX_KNOWN:
            self._stacks.clear()
        stack = self._stacks[raw] = tuple(out)
        return stack

    def _label(self, key: bytes) -> str | None:
        code_id, offset, globals_id = FRAME.unpack(key)
        code = self._held(self._codes, code_id, CodeType)
        if code is None:
            return None
        g = self._held(self._globals, globals_id, dict)
        if g is not None:
            module = self._modules[code_id] = str(g.get("__name__", "?"))
        else:  # a torn read's globals: the module this code was seen in before
            module = self._modules.get(code_id, "?")
        if len(self._frame_labels) > MAX_KNOWN:
            self._frame_labels.clear()
        label = self._frame_labels[key] = (
            f"{module}:{getattr(code, 'co_qualname', code.co_name)}:{self.frames.line(code, offset)}"
        )
        return label

    def _held(self, table: dict[int, Any], address: int, kind: type) -> Any:
        """The object of type `kind` at `address`, held from now on: a held object cannot
        be freed, so its address keeps naming it."""
        obj = table.get(address)
        if obj is None:
            obj = self.frames.object_at(address, kind)
            if obj is not None:
                if len(table) >= MAX_KNOWN:  # code made at run time (exec, recompiles): let it go, name anew
                    for t in (self._codes, self._globals, self._modules, self._frame_labels, self._stacks):
                        t.clear()
                table[address] = obj
        return obj
