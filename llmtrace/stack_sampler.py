"""In-process stack sampler: which functions a stage spends its time in, without ptrace.

A daemon thread wakes every `interval_s` and records each thread's stack as a SAMPLE
record (folded "module:func:line;...;module:func:line", outermost first; every frame
carries its line, so a call into C such as np.concatenate is still named by the source
line that makes it, and a library call by the program's line that makes it). The analyzer
places samples on the span timeline by (pid, tid, time), so every stage gets its top
functions.

Where `llmtrace._frames` works (CPython 3.11/3.12 on Linux, the extension built) the
stacks are read without the GIL (native_stacks.py): the tick sees a thread running pure
Python where it is. Elsewhere they are read with sys._current_frames(), which needs the
GIL, and a thread running Python is seen only when it lets the GIL go: at its next call
into C that releases it, or after the switch interval (sys.getswitchinterval(), 5 ms by
default). The time of an f-string formatting an array, a deepcopy or np.pad's Python code
then lands in the matmul or the torch.cat that follows it: on a numpy server
(benchmarks/sampler_bias.py) those three had no sample at all under the GIL reader. That
reader lowers the switch interval to half the sampling interval, which is what it costs:
on `transformers serve` recorded at 250 Hz, 21% of its throughput with half the interval,
8.5% leaving CPython's 5 ms (medians of 3 interleaved rounds). The GIL-free reader leaves
the switch interval alone. A GIL-reader tick reuses the stack of a thread still at the
same instruction of the same frame as at the last tick (blocked in a wait), and relabels
only the frames below the deepest caller that has not moved.
py-spy (`llmtrace record --py-spy`) samples from outside, with no such bias either.

On CPython 3.11 a GIL-reader tick skips while any thread is importing a module: walking
`f_back` from another thread's frame can then reach a frame an extension module's init
left half made and crash the process (SIGSEGV in PyFrame_GetBack; the same race segfaults
other in-process samplers on 3.11, cpython#99110 and its follow-ups). Seen here as an
engine agent killed while importing torch (faulthandler: this thread in `_labels_of`),
about 4 times in ~150 recorded runs. The GIL-free reader makes no frame objects and reads
through process_vm_readv, which fails instead of crashing.
"""

from __future__ import annotations

import importlib._bootstrap
import os
import random
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable

from . import native_stacks, recorder
from .spool_format import SAMPLE

MAX_DEPTH = 48
_IMPORT_RACE = sys.version_info < (3, 12)  # f_back across threads mid-import can crash 3.11
MAX_GIL_SHARE = 0.02
COST_SMOOTHING = 0.02  # the tick cost's moving average weighs the last ~50 ticks
_SKIP_THREADS = ("llmtrace-flush", "llmtrace-sampler")
# sees each thread's stacks (labels, outermost first -> ticks) every `every_s`; True: done
Watcher = Callable[[dict[int, Counter[tuple[str, ...]]]], bool]


def importing() -> bool:
    """Whether some thread holds a module's import lock (is importing it) right now. An
    entry of `_module_locks` may outlive its import (a kept traceback holds the lock
    object), so a lock counts only while acquired (its `count`, CPython 3.11)."""
    for ref in list(importlib._bootstrap._module_locks.values()):
        lock = ref()
        if lock is not None and getattr(lock, "count", 0):
            return True
    return False


class StackSampler:
    def __init__(self, interval_s: float = 0.001, gil_free: bool = True):
        """gil_free=False reads under the GIL even where the GIL-free reader works (to
        compare the two: benchmarks/sampler_bias.py)."""
        self.interval_s = interval_s
        self._labels: dict = {}  # code object -> "module:qualname"
        self._line_labels: dict = {}  # (code object, instruction offset) -> "module:qualname:line"
        self._chains: dict = {}  # id(frame) -> (frame, f_lasti, labels up to it) of the frames seen last tick
        self._stack_ids: dict = {}  # thread ident -> its stack's string id at the last tick
        self._ids_by_labels: dict = {}  # a stack's labels (tuple) -> its string id
        self._watcher: tuple[Watcher, float] | None = None
        self._seen: Counter[tuple[int, int]] = Counter()  # (tid, stack id) -> ticks, while watched
        self._watch_due = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="llmtrace-sampler", daemon=True)
        self.samples = 0
        frames = native_stacks.reader() if gil_free else None
        self.native = native_stacks.NativeStacks(frames) if frames is not None else None

    def start(self) -> StackSampler:
        self.set_interval(self.interval_s)
        self._thread.start()
        return self

    def set_interval(self, interval_s: float) -> None:
        """Sample every `interval_s` from the next tick on (the GIL reader's switch interval
        follows)."""
        self.interval_s = interval_s
        if self.native is None:
            sys.setswitchinterval(min(sys.getswitchinterval(), interval_s / 2))

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

    def _line_label(self, f) -> str:
        """Keyed by the instruction offset: f_lineno decodes the code's line table each time."""
        key = (f.f_code, f.f_lasti)
        label = self._line_labels.get(key)
        if label is None:  # every frame's line: the analyzer reads the program's own line under a library call
            label = self._line_labels[key] = f"{self._label(f)}:{f.f_lineno}"
        return label

    def _labels_of(self, frame, prev: dict, cur: dict) -> tuple:
        """The labels of `frame`'s stack, outermost first. A caller frame still at the
        instruction it was at the last tick (it waits for its callee) has the same labels
        up to it: the walk stops there and reuses them. prev/cur: id(frame) -> (frame,
        f_lasti, labels up to it), of the last tick / this one. Tuples of shared strings,
        not prefix strings: a deep stack (a transformers generate loop) rebuilt each tick
        cost O(depth^2) characters."""
        fresh, prefix = [], ()
        while frame is not None and len(fresh) < MAX_DEPTH:
            hit = prev.get(id(frame))
            if (
                hit is not None
                and hit[0] is frame
                and hit[1] == frame.f_lasti
                and len(hit[2]) + len(fresh) <= MAX_DEPTH
            ):
                prefix = hit[2]
                break
            fresh.append(frame)
            frame = frame.f_back
        for f in reversed(fresh):
            prefix = (*prefix, self._line_label(f))
            cur[id(f)] = (f, f.f_lasti, prefix)
        return prefix

    def _stack_id(self, labels: tuple) -> int:
        sid = self._ids_by_labels.get(labels)
        if sid is None:
            sid = self._ids_by_labels[labels] = recorder.intern(";".join(labels))
        return sid

    def watch(self, watcher: Watcher | None, every_s: float = 1.0) -> None:
        """Show `watcher` the stacks sampled since its last look, every `every_s`, until it
        returns True (auto/hot_loop.py reads the program's step loop from them)."""
        self._watcher = (watcher, every_s) if watcher is not None else None
        self._seen.clear()
        self._watch_due = time.monotonic() + every_s

    def _emit(self, tid: int, stack_id: int, now: int) -> None:
        recorder.emit(SAMPLE, stack_id, 0, now, now, tid=tid)
        if self._watcher is not None:
            self._seen[(tid, stack_id)] += 1

    def _show_watcher(self) -> None:
        assert self._watcher is not None
        watcher, every_s = self._watcher
        self._watch_due = time.monotonic() + every_s
        labels = {sid: stack for stack, sid in self._ids_by_labels.items()}  # once a look, not a tick
        by_thread: dict[int, Counter[tuple[str, ...]]] = {}
        for (tid, sid), n in self._seen.items():
            by_thread.setdefault(tid, Counter())[labels[sid]] += n
        self._seen.clear()
        try:
            done = watcher(by_thread)
        except Exception as e:  # a watcher's failure never ends sampling
            print(f"llmtrace: stack watcher failed: {e!r}", file=sys.stderr)
            done = True
        if done:
            self._watcher = None

    def sample_once(self) -> int:
        if not recorder.is_enabled() or (_IMPORT_RACE and importing()):
            return 0
        native = {t.ident: t.native_id for t in threading.enumerate() if t.name not in _SKIP_THREADS}
        now = time.perf_counter_ns()
        n, chains = 0, {}
        for ident, frame in sys._current_frames().items():
            tid = native.get(ident)
            if tid is None:
                continue
            stack_id = self._stack_ids.get(ident)
            # A thread still at the same instruction of the same frame (blocked in a wait, a
            # C call) has the same stack: no walk, no string (most threads of a server idle).
            hit = self._chains.get(id(frame))
            if stack_id is None or hit is None or hit[0] is not frame or hit[1] != frame.f_lasti:
                stack_id = self._stack_ids[ident] = self._stack_id(self._labels_of(frame, self._chains, chains))
            else:
                chains[id(frame)] = hit
            self._emit(tid, stack_id, now)
            n += 1
        self._chains = chains  # frames held for one tick only
        self.samples += n
        return n

    def sample_native(self, sleep_s: float) -> int:
        """Sleep `sleep_s`, then one GIL-free tick (the module docstring)."""
        assert self.native is not None
        now, rows = self.native.snapshot(sleep_s, MAX_DEPTH, _SKIP_THREADS)
        if not recorder.is_enabled():
            return 0
        n = 0
        for tid, raw in rows:
            labels = self.native.labels(raw)
            if labels is None:  # a frame that returned before it could be named
                continue
            self._emit(tid, self._stack_id(labels), now)
            n += 1
        self.samples += n
        return n

    def _run(self) -> None:
        """A tick holds the GIL: with many threads or deep stacks it costs more, and the rate
        drops so that the sampler takes at most MAX_GIL_SHARE of the program's time. The
        rate follows a slow average of the tick's CPU cost (COST_SMOOTHING), never one tick:
        a rate that reacted to what a tick found would sample that code less (the analyzer
        weighs each sample by its neighbours' spacing)."""
        wait, cost = self.interval_s, 0.0
        due = time.perf_counter()
        while not self._stop.is_set():
            t0 = time.thread_time()  # CPU time: a GIL-free read costs a CPU too, sleeping nothing
            if self.native is not None:
                # ticks on their own beat: the wait for the GIL after a read (up to the switch
                # interval) overlaps the next sleep instead of stretching every interval, and
                # no tick waits on the program's GIL hand-off (a loop's release points would
                # set the phase); jittered, so that no loop of a period near it aliases
                due = max(due + wait * (0.75 + 0.5 * random.random()), time.perf_counter())
                try:
                    self.sample_native(due - time.perf_counter())
                except Exception:  # a failed tick never ends sampling: the GIL reader takes over
                    self.native = None
                    self.set_interval(self.interval_s)
            elif self._stop.wait(wait):
                break
            else:
                self.sample_once()
            if self._watcher is not None and time.monotonic() >= self._watch_due:
                self._show_watcher()
            cost += COST_SMOOTHING * (time.thread_time() - t0 - cost)  # CPU time: not other threads'
            wait = max(self.interval_s, cost * (1 / MAX_GIL_SHARE - 1))


_sampler: StackSampler | None = None
_watcher: tuple[Watcher, float] | None = None  # for the sampler started later, and a fork's


def start(interval_s: float = 0.001) -> StackSampler:
    """The process's sampler, at `interval_s` (a running one takes the new rate: configure
    called again, or after the environment started one, asks for it)."""
    global _sampler
    if _sampler is None:
        _sampler = StackSampler(interval_s)
        if _watcher is not None:
            _sampler.watch(*_watcher)
        _sampler.start()
    elif _sampler.interval_s != interval_s:
        _sampler.set_interval(interval_s)
    return _sampler


def watch(watcher: Watcher | None, every_s: float = 1.0) -> None:
    """`StackSampler.watch` on this process's sampler, now or when it starts (a forked
    child's watches its own stacks); None: no more."""
    global _watcher
    _watcher = (watcher, every_s) if watcher is not None else None
    if _sampler is not None:
        _sampler.watch(watcher, every_s)


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
