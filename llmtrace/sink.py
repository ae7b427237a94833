"""Where records go: a spool file per process (`OUT/spool/<pid>.lts`). Live viewers (the
TUI) tail these files; the mapped spool makes new batches visible within milliseconds.

A background thread drains the recorder every `interval_s` and appends one CRC-checked
batch; it also flushes at exit and on SIGTERM and SIGHUP. By default (`mapped=True`) batches are
copied into a shared memory mapping of the spool file, grown in zero-filled chunks: no
syscall per batch, so the thread flushes every 5 ms, and the dirty pages belong to the
kernel, so a SIGKILLed process loses only the last few milliseconds. `mapped=False`
appends each batch with one write() every 50 ms (a kill loses up to 50 ms).
benchmarks/crash_survival.py measures both.
"""

from __future__ import annotations

import atexit
import mmap
import os
import signal
import sys
import threading
import time
from time import sleep as _sleep  # bound before llmtrace.instrument() wraps time.sleep: the flush loop is ours

from . import clock_domain, cpu_time, gpu, recorder
from .spool_format import CLOSED, encode_batch, encode_header

SPOOL_SUFFIX = ".lts"
MAPPED_INTERVAL_S = 0.005
APPEND_INTERVAL_S = 0.05
IDLE_INTERVAL_S = 0.05  # an idle process flushes this often (no more than the write() spool loses)
CHUNK = 1 << 20  # the mapping grows by this much (rounded to pages)


class _AppendFile:
    """One write() per batch; the file is the batches written so far."""

    def __init__(self, fd: int, pos: int):
        self.fd, self.pos = fd, pos

    def append(self, batch: bytes) -> None:
        os.write(self.fd, batch)
        self.pos += len(batch)

    def close(self) -> None:
        os.close(self.fd)


class _MappedFile:
    """Batches copied into a MAP_SHARED mapping of the file from offset `pos` on. The
    file is preallocated (zero-filled) a chunk ahead; readers stop at the zero tail.
    close() cuts the tail off; after a kill it stays, harmless."""

    def __init__(self, fd: int, pos: int):
        self.fd, self.pos, self.size = fd, pos, 0
        self.mm: mmap.mmap | None = None
        self._grow(pos + CHUNK)

    def _grow(self, need: int) -> None:
        size = -(-need // mmap.PAGESIZE) * mmap.PAGESIZE
        # Blocks reserved up front: a full disk fails here, not as SIGBUS on a page fault later.
        os.posix_fallocate(self.fd, self.size, size - self.size)
        if self.mm is None:
            self.mm = mmap.mmap(self.fd, size)
        else:
            self.mm.resize(size)
        self.size = size

    def append(self, batch: bytes) -> None:
        end = self.pos + len(batch)
        if end > self.size:
            self._grow(end + CHUNK)
        # The batch magic goes in last: a reader sees zeros (not there yet) or the whole batch.
        self.mm[self.pos + 4 : end] = memoryview(batch)[4:]
        self.mm[self.pos : self.pos + 4] = batch[:4]
        self.pos = end

    def close(self) -> None:
        self.mm.close()
        os.ftruncate(self.fd, self.pos)
        os.close(self.fd)


def _thread_names() -> dict[str, str]:
    return {str(t.native_id): t.name for t in threading.enumerate() if t.native_id is not None}


class Spooler:
    def __init__(
        self,
        out_dir: str,
        process_name: str,
        trace_id: int,
        interval_s: float | None = None,
        extra_header: dict | None = None,
        mapped: bool = True,
    ):
        self.out_dir = out_dir
        self.process_name = process_name
        self.mapped = mapped
        if interval_s is None:
            interval_s = MAPPED_INTERVAL_S if mapped else APPEND_INTERVAL_S
        self.interval_s = min(interval_s, 0.1)
        self.pid = os.getpid()
        spool = os.path.join(out_dir, "spool")
        os.makedirs(spool, exist_ok=True)
        self.path = os.path.join(spool, f"{self.pid}{SPOOL_SUFFIX}")
        fd = os.open(self.path, (os.O_RDWR if mapped else os.O_WRONLY | os.O_APPEND) | os.O_CREAT | os.O_TRUNC, 0o600)
        self._test_skew, wall_skew = clock_domain.injected_skew(process_name)  # (0, 0) unless a test asks
        self.header = {
            "pid": self.pid,
            "process_name": process_name,
            "trace_id": f"{trace_id:016x}",
            # time.time_ns() - perf_counter_ns(): add to a record's ns to get Unix time.
            "epoch_offset_ns": time.time_ns() + wall_skew - time.perf_counter_ns() - self._test_skew,
            "clock": "CLOCK_MONOTONIC",
            "clock_domain": clock_domain.domain() + (f"#test{self._test_skew}" if self._test_skew else ""),
            "argv": sys.argv[:8],
            "cwd": os.getcwd(),  # argv[0] (the program's __main__, for source lines) is relative to it
            "backend": recorder.BACKEND,
            "span_cost_ns": calibrate_span_cost(),
            "machine": cpu_time.machine(),
            "resource": dict(_resource),
            **(extra_header or {}),
        }
        recorder.requeue_strings()  # this file's first batch names everything interned so far
        self._head = encode_header(self.header)
        os.write(fd, self._head)
        self._file: _AppendFile | _MappedFile | None = (_MappedFile if mapped else _AppendFile)(fd, len(self._head))
        self._lock = threading.Lock()
        self._names_sent: dict[str, str] = {}
        self._cpu = cpu_time.CpuSampler()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="llmtrace-flush", daemon=True)
        self._thread.start()
        self.batches = 0

    @property
    def written(self) -> int:
        """Bytes of the spool file holding the header and the batches so far (a mapped file is
        larger until closed: its zero-filled tail)."""
        f = self._file
        return f.pos if f is not None else os.path.getsize(self.path)

    def _run(self) -> None:
        # Every interval_s while records flow; an idle process backs off to IDLE_INTERVAL_S
        # so a quiet process does not wake 200 times a second for nothing.
        wait = self.interval_s
        while True:
            _sleep(wait)  # cheaper than Event.wait(timeout) at a 5 ms period
            if self._stop.is_set():
                return
            busy = self.flush() > 0
            wait = self.interval_s if busy else min(IDLE_INTERVAL_S, wait * 2)

    def flush(self, meta: dict | None = None) -> int:
        """Drain the recorder and append one batch; returns the number of records written."""
        with self._lock:
            if self._file is None:
                return 0
            gpu.poll()
            records, n, strings, dropped = recorder.drain()
            m = dict(meta or {})
            cpu = self._cpu.due()
            if cpu is not None:
                m[cpu_time.CPU_KEY] = cpu
            if not (n or strings or m or dropped):
                return 0  # idle: not even the thread names are worth a look
            names = _thread_names()
            new_names = {k: v for k, v in names.items() if self._names_sent.get(k) != v}
            if new_names:
                m["threads"] = new_names
                self._names_sent.update(new_names)
            if dropped:
                m["dropped"] = {str(k): v for k, v in dropped.items()}
            if not (n or strings or m):
                return 0
            if self._test_skew:
                records = clock_domain.shift_records(records, n, self._test_skew)
                for k in (cpu_time.CPU_KEY, CLOSED):  # the meta's timestamps too
                    if k in m:
                        m[k] = {**m[k], "ns": m[k]["ns"] + self._test_skew}
            batch = encode_batch(strings, m, records, n)
            self._file.append(batch)
            self.batches += 1
            return n

    def rename(self, process_name: str) -> None:
        """Name this process differently from now on (readers apply the batch's meta)."""
        self.process_name = process_name
        self.flush({"process_name": process_name})

    def close(self, reason: str = "exit") -> None:
        """Flush and close; the last batch says the recording ended here and why ("exit",
        "SIGTERM", ...): a spool without it belongs to a process that was killed or crashed
        (or still runs)."""
        self._stop.set()
        if threading.current_thread() is not self._thread and self._thread.is_alive():
            self._thread.join(timeout=1.0)
        self.flush({CLOSED: {"reason": reason, "ns": time.perf_counter_ns()}})
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


def calibrate_span_cost(n: int = 2000) -> float:
    """Measured cost of one enabled span in this process (ns), for the report's tracing section."""
    was = recorder.is_enabled()
    recorder.set_enabled(True)
    span = recorder.span
    try:
        t0 = time.perf_counter_ns()
        for _ in range(n):
            with span("llmtrace.calibrate"):
                pass
        t1 = time.perf_counter_ns()
    finally:
        recorder.set_enabled(was)
    recorder.drain()  # discard the calibration records
    return (t1 - t0) / n


_spooler: Spooler | None = None
_resource: dict = {}  # this process's descriptive attributes (configure(resource=...))


def set_resource(attrs: dict) -> None:
    """Add attributes that describe the whole process (a scheduler's limits, a model
    name): in the spool header of files started later, and as batch metadata now."""
    _resource.update(attrs)
    if _spooler is not None:
        _spooler.flush({"resource": dict(attrs)})


def start(
    out_dir: str, process_name: str, trace_id: int, extra_header: dict | None = None, mapped: bool = True
) -> Spooler:
    global _spooler
    stop(final=False)
    _spooler = Spooler(out_dir, process_name, trace_id, extra_header=extra_header, mapped=mapped)
    _install_exit_hooks()
    return _spooler


def current() -> Spooler | None:
    return _spooler


def flush() -> int:
    return _spooler.flush() if _spooler is not None else 0


_final_hooks: list = []


def on_final_stop(fn) -> None:
    """Call `fn()` when this process stops recording for good (exit, a stop signal, a
    multiprocessing child's target returning: its os._exit skips atexit), before the spool
    closes: tools that keep data in memory (viztracer's window) write it there."""
    _final_hooks.append(fn)


def stop(reason: str = "exit", final: bool = True) -> None:
    """Close the spool. `final` (the process is done recording: exit, a stop signal,
    shutdown()): the final-stop hooks run, and spans still open are recorded as ending now,
    flagged open-at-stop (a daemon thread mid-request, an agent mid-step at SIGTERM), so the
    trace keeps them."""
    global _spooler
    if _spooler is not None:
        if final:
            for fn in list(_final_hooks):
                try:
                    fn()
                except Exception as e:  # noqa: BLE001 (a tool's failure must not lose the spool)
                    print(f"llmtrace: {getattr(fn, '__qualname__', fn)} failed at stop: {e!r}", file=sys.stderr)
            recorder.close_open()
        _spooler.close(reason)
        _spooler = None


_hooks_installed = False
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)  # both end a process by default: keep its trace
_prev_handlers: dict = {}


def _install_exit_hooks() -> None:
    global _hooks_installed
    if _hooks_installed:
        return
    _hooks_installed = True
    atexit.register(stop)
    if threading.current_thread() is threading.main_thread():
        for sig in _STOP_SIGNALS:
            prev = signal.getsignal(sig)
            if prev in (signal.SIG_DFL, None) or callable(prev):  # an ignored signal stays ignored
                _prev_handlers[sig] = prev
                signal.signal(sig, _on_stop_signal)


def _on_stop_signal(signum, frame):
    stop(signal.Signals(signum).name)
    prev = _prev_handlers.get(signum)
    if callable(prev):
        prev(signum, frame)
    else:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def _after_fork_in_child() -> None:
    """A forked child writes its own spool file; the parent's buffered records stay with the parent."""
    global _spooler, _hooks_installed
    recorder.reset_after_fork()
    parent = _spooler
    _spooler = None
    _hooks_installed = False
    if parent is not None:
        start(parent.out_dir, f"{parent.process_name}-child", int(parent.header["trace_id"], 16), mapped=parent.mapped)


os.register_at_fork(after_in_child=_after_fork_in_child)
