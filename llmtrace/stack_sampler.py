"""In-process stack sampler: which functions a stage spends its time in, without ptrace.

A daemon thread wakes every `interval_s`, reads `sys._current_frames()` and records each
thread's stack as a SAMPLE record (folded "module:func:line;...;module:func:line",
outermost first; every frame carries its line, so a call into C such as np.concatenate is
still named by the source line that makes it, and a library call by the program's line
that makes it). A thread still at the same instruction of the same frame as at the last
tick (blocked in a wait) reuses that tick's stack string. The analyzer places samples on the span timeline by (pid, tid, time), so every
stage gets its top functions. Samples are taken when the sampler gets the GIL, so a
thread running pure Python for a long stretch is sampled at its next switch point
(sys.getswitchinterval(), 5 ms by default: a 3 ms pure-Python stage would hardly ever be
sampled); `start` lowers the switch interval to a quarter of the sampling interval, which
costs a GIL hand-off per sample; py-spy (`llmtrace record --py-spy`) has no such bias.
"""
from __future__ import annotations

import os
import sys
import threading
import time

from . import recorder
from .spool_format import SAMPLE

MAX_DEPTH = 48
_SKIP_THREADS = ("llmtrace-flush", "llmtrace-sampler")


class StackSampler:
    def __init__(self, interval_s: float = 0.001):
        self.interval_s = interval_s
        self._labels: dict = {}  # code object -> "module:qualname"
        self._last: dict = {}  # thread ident -> (leaf frame, its f_lasti, stack string id) at the last tick
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="llmtrace-sampler", daemon=True)
        self.samples = 0

    def start(self) -> "StackSampler":
        sys.setswitchinterval(min(sys.getswitchinterval(), self.interval_s / 4))
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=1.0)

    def _label(self, frame) -> str:
        code = frame.f_code
        label = self._labels.get(code)
        if label is None:
            module = frame.f_globals.get("__name__", "?")
            label = self._labels[code] = f"{module}:{getattr(code, 'co_qualname', code.co_name)}"
        return label

    def _folded(self, frame) -> str:
        labels = []
        while frame is not None and len(labels) < MAX_DEPTH:
            labels.append(f"{self._label(frame)}:{frame.f_lineno}")  # every frame's line: the
            frame = frame.f_back  # analyzer reads the program's own line under a library call
        labels.reverse()
        return ";".join(labels)

    def sample_once(self) -> int:
        if not recorder.is_enabled():
            return 0
        native = {t.ident: t.native_id for t in threading.enumerate() if t.name not in _SKIP_THREADS}
        now = time.perf_counter_ns()
        n, last = 0, {}
        for ident, frame in sys._current_frames().items():
            tid = native.get(ident)
            if tid is None:
                continue
            prev = self._last.get(ident)
            # A thread still at the same instruction of the same frame (blocked in a wait, a
            # C call) has the same stack: no walk, no string (most threads of a server idle).
            if prev is not None and prev[0] is frame and prev[1] == frame.f_lasti:
                stack_id = prev[2]
            else:
                stack_id = recorder.intern(self._folded(frame))
            last[ident] = (frame, frame.f_lasti, stack_id)
            recorder.emit(SAMPLE, stack_id, 0, now, now, tid=tid)
            n += 1
        self._last = last  # frames held for one tick only
        self.samples += n
        return n

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample_once()


_sampler: StackSampler | None = None


def start(interval_s: float = 0.001) -> StackSampler:
    global _sampler
    if _sampler is None:
        _sampler = StackSampler(interval_s).start()
    return _sampler


def stop() -> None:
    global _sampler
    if _sampler is not None:
        _sampler.stop()
        _sampler = None


def _restart_in_child() -> None:
    """A forked child (multiprocessing's default) has no sampler thread: it starts its own
    at the parent's rate, after the spool's fork handler gave it its own spool file."""
    global _sampler
    if _sampler is not None:
        interval, _sampler = _sampler.interval_s, None
        start(interval)


os.register_at_fork(after_in_child=_restart_in_child)
