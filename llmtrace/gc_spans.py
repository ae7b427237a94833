"""Garbage-collector pauses as `gc` spans (attrs: generation, collected), via gc.callbacks.

A collection runs inside whatever the thread was doing, so the analyzer finds the
pauses that land inside engine steps by their time."""

from __future__ import annotations

import gc
from time import perf_counter_ns

from . import recorder
from .spool_format import SPAN

_start_ns = 0
_installed = False


def _callback(phase: str, info: dict) -> None:
    global _start_ns
    if phase == "start":
        _start_ns = perf_counter_ns()
    elif _start_ns and recorder.is_enabled():
        sid, step = recorder.current()
        recorder.emit(
            SPAN,
            recorder.intern("gc"),
            recorder.intern("gc"),
            _start_ns,
            perf_counter_ns(),
            recorder.new_span_id(),
            sid,
            0,
            step,
            {"generation": info.get("generation", -1), "collected": info.get("collected", 0)},
        )
        _start_ns = 0


def install() -> None:
    global _installed
    if not _installed:
        gc.callbacks.append(_callback)
        _installed = True


def uninstall() -> None:
    global _installed
    if _installed:
        gc.callbacks.remove(_callback)
        _installed = False
