"""Where records go: a spool file per process (`OUT/spool/<pid>.lts`), and optionally a live
socket that receives the same batches (the TUI's feed).

A background thread drains the recorder every `interval_s` (≤ 0.1 s) and appends one
CRC-checked batch with a single write(); it also flushes at exit and on SIGTERM, so a
crash loses at most the last interval.
"""
from __future__ import annotations

import atexit
import os
import signal
import socket
import sys
import threading
import time

from . import gpu, recorder
from .spool_format import encode_batch, encode_header

SPOOL_SUFFIX = ".lts"


def _thread_names() -> dict[str, str]:
    return {str(t.native_id): t.name for t in threading.enumerate() if t.native_id is not None}


class Spooler:
    def __init__(self, out_dir: str, process_name: str, trace_id: int, interval_s: float = 0.05,
                 live: str | None = None, extra_header: dict | None = None):
        self.out_dir = out_dir
        self.process_name = process_name
        self.interval_s = min(interval_s, 0.1)
        self.pid = os.getpid()
        spool = os.path.join(out_dir, "spool")
        os.makedirs(spool, exist_ok=True)
        self.path = os.path.join(spool, f"{self.pid}{SPOOL_SUFFIX}")
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_TRUNC, 0o600)
        self.header = {
            "pid": self.pid,
            "process_name": process_name,
            "trace_id": f"{trace_id:016x}",
            # time.time_ns() - perf_counter_ns(): add to a record's ns to get Unix time.
            "epoch_offset_ns": time.time_ns() - time.perf_counter_ns(),
            "clock": "CLOCK_MONOTONIC",
            "argv": sys.argv[:8],
            "backend": recorder.BACKEND,
            "span_cost_ns": calibrate_span_cost(),
            **(extra_header or {}),
        }
        recorder.requeue_strings()  # this file's first batch names everything interned so far
        self._head = encode_header(self.header)
        os.write(self._fd, self._head)
        self._lock = threading.Lock()
        self._names_sent: dict[str, str] = {}
        self._live = _connect_live(live) if live else None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="llmtrace-flush", daemon=True)
        self._thread.start()
        self.batches = 0

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.flush()

    def flush(self, meta: dict | None = None) -> int:
        """Drain the recorder and append one batch; returns the number of records written."""
        with self._lock:
            if self._fd < 0:
                return 0
            gpu.poll()
            records, n, strings, dropped = recorder.drain()
            names = _thread_names()
            new_names = {k: v for k, v in names.items() if self._names_sent.get(k) != v}
            m = dict(meta or {})
            if new_names:
                m["threads"] = new_names
                self._names_sent.update(new_names)
            if dropped:
                m["dropped"] = {str(k): v for k, v in dropped.items()}
            if not (n or strings or m):
                return 0
            batch = encode_batch(strings, m, records, n)
            os.write(self._fd, batch)
            self.batches += 1
            if self._live is not None:
                self._send_live(batch)
            return n

    def _send_live(self, batch: bytes) -> None:
        try:
            self._live.sendall(batch)
        except OSError:
            self._live.close()  # the viewer went away; the spool file still has everything
            self._live = None

    def close(self) -> None:
        self._stop.set()
        if threading.current_thread() is not self._thread and self._thread.is_alive():
            self._thread.join(timeout=1.0)
        self.flush()
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            if self._live is not None:
                self._live.close()
                self._live = None


def _connect_live(path: str) -> socket.socket | None:
    """Connect to a live viewer's UNIX socket; the first bytes sent are the spool header."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
    except OSError:
        s.close()
        return None
    return s


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
_prev_sigterm = None


def start(out_dir: str, process_name: str, trace_id: int, live: str | None = None,
          extra_header: dict | None = None) -> Spooler:
    global _spooler
    stop()
    _spooler = Spooler(out_dir, process_name, trace_id, live=live, extra_header=extra_header)
    if _spooler._live is not None:
        _spooler._send_live(_spooler._head)
    _install_exit_hooks()
    return _spooler


def current() -> Spooler | None:
    return _spooler


def flush() -> int:
    return _spooler.flush() if _spooler is not None else 0


def stop() -> None:
    global _spooler
    if _spooler is not None:
        _spooler.close()
        _spooler = None


_hooks_installed = False


def _install_exit_hooks() -> None:
    global _hooks_installed, _prev_sigterm
    if _hooks_installed:
        return
    _hooks_installed = True
    atexit.register(stop)
    if threading.current_thread() is threading.main_thread():
        _prev_sigterm = signal.getsignal(signal.SIGTERM)
        if _prev_sigterm in (signal.SIG_DFL, None) or callable(_prev_sigterm):
            signal.signal(signal.SIGTERM, _on_sigterm)


def _on_sigterm(signum, frame):
    stop()
    prev = _prev_sigterm
    if callable(prev):
        prev(signum, frame)
    else:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)


def _after_fork_in_child() -> None:
    """A forked child writes its own spool file; the parent's buffered records stay with the parent."""
    global _spooler, _hooks_installed
    recorder.reset_after_fork()
    parent = _spooler
    _spooler = None
    _hooks_installed = False
    if parent is not None:
        start(parent.out_dir, f"{parent.process_name}-child", int(parent.header["trace_id"], 16))


os.register_at_fork(after_in_child=_after_fork_in_child)
