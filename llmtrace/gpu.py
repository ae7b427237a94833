"""Device time for `span(..., device=True)` from CUDA events, resolved without a sync.

On enter a start event and on exit an end event are recorded on the current stream.
Pending pairs are resolved later, oldest first, with the non-blocking `Event.query()`:
at the next device span (a later step) and at flush. The device interval is put on the
host clock through one anchor event whose host time is known (recorded once, with a
single synchronize, when timing is installed). torch is imported only by `install()`.
With `LLMTRACE_DEVICE_ACTIVITY=N` the first N device spans also get their busy time from
the GPU's kernel records (device_activity.py); their host intervals are kept for it.
"""

from __future__ import annotations

import sys
import threading
from collections import deque
from time import perf_counter_ns

from . import device_activity, recorder
from .spool_format import DEVICE

MAX_PENDING = 4096  # pairs not yet complete; beyond this the oldest are dropped and counted


class DeviceTimer:
    def __init__(self, torch, window: device_activity.Window | None = None):
        self._torch = torch
        self.window = window
        self._host_start: dict[int, int] = {}  # id(start event) -> host ns, while the window fills
        self._pending: deque = deque()
        self._lock = threading.Lock()
        self.dropped = 0
        self._free: list = []
        torch.cuda.synchronize()
        self._anchor = torch.cuda.Event(enable_timing=True)
        self._anchor.record()
        self._anchor.synchronize()
        self._anchor_ns = perf_counter_ns()

    def _event(self):
        return self._free.pop() if self._free else self._torch.cuda.Event(enable_timing=True)

    def begin(self):
        self.poll()
        ev = self._event()
        if self.window is not None:
            self._host_start[id(ev)] = perf_counter_ns()
        ev.record()
        return ev

    def end(self, start_ev, span_id, name_id, stage_id, step):
        ev = self._event()
        ev.record()
        window = self.window  # once: the flush thread may let go of it meanwhile
        if window is not None:
            self._window_add(window, start_ev, span_id, step)
        with self._lock:
            if len(self._pending) >= MAX_PENDING:
                self._pending.popleft()
                self.dropped += 1
            self._pending.append((start_ev, ev, span_id, name_id, stage_id, step))

    def poll(self) -> int:
        """Resolve every completed pair (in order); never blocks. Returns how many."""
        done = 0
        with self._lock:
            while self._pending and self._pending[0][1].query():
                s, e, span_id, name_id, stage_id, step = self._pending.popleft()
                t0 = self._anchor_ns + int(self._anchor.elapsed_time(s) * 1e6)
                t1 = t0 + int(s.elapsed_time(e) * 1e6)  # short interval: full float precision
                recorder.emit(DEVICE, name_id, stage_id, t0, t1, span_id, 0, 0, step)
                self._free += (s, e)
                done += 1
                window = self.window
                if window is not None:
                    window.device_done(span_id)
        return done

    def _window_add(self, window, start_ev, span_id, step) -> None:
        t0 = self._host_start.pop(id(start_ev), None)
        if t0 is not None and not window.add(t0, perf_counter_ns(), span_id, step):
            self._host_start.clear()

    def finish_window(self) -> None:
        """Read a complete window's records (the flush thread: not on the model's path)."""
        w = self.window
        if w is not None and w.complete:
            self.window = None  # no more bookkeeping per span
            w.emit()


_timer: DeviceTimer | None = None


def install() -> bool:
    """Turn on device timing if torch with CUDA is usable; returns whether it is on."""
    global _timer
    if _timer is not None:
        return True
    try:
        import torch
    except ImportError:
        return False
    if not torch.cuda.is_available():
        return False
    _timer = DeviceTimer(torch, _activity_window())
    recorder.set_device_hook(_timer)
    return True


def _activity_window() -> device_activity.Window | None:
    size = device_activity.window_from_env()
    if not size:
        return None
    try:
        return device_activity.Window(size)
    except Exception as e:  # noqa: BLE001 (no CUPTI, another profiler running: timing goes on without)
        print(f"llmtrace: device activity unavailable ({e!r}); device time from CUDA events only", file=sys.stderr)
        return None


def poll() -> int:
    """Resolve the completed device spans; a complete activity window is read here too
    (the spool's flush thread calls this)."""
    if _timer is None:
        return 0
    done = _timer.poll()
    _timer.finish_window()
    return done


def uninstall() -> None:
    global _timer
    recorder.set_device_hook(None)
    _timer = None
