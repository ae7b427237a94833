"""The recorder backend: the C accelerator when it is built, else the pure-Python reference.

Both expose the same functions (see `_pyrecorder`) and write the same 112-byte records.
Set LLMTRACE_PURE_PYTHON=1 to force the Python one (the tests run both).
"""
import os

backend = None
if os.environ.get("LLMTRACE_PURE_PYTHON") != "1":
    try:
        from . import _fastspan as backend  # type: ignore[attr-defined]
    except ImportError:
        backend = None
if backend is None:
    from . import _pyrecorder as backend

span = backend.span
instant = backend.instant
counter = backend.counter
traced = backend.traced
emit = backend.emit
intern = backend.intern
drain = backend.drain
current = backend.current
set_current = backend.set_current
reset_current = backend.reset_current
new_span_id = backend.new_span_id
set_enabled = backend.set_enabled
is_enabled = backend.is_enabled
set_device_hook = backend.set_device_hook
reset_after_fork = backend.reset_after_fork
requeue_strings = backend.requeue_strings
close_open = backend.close_open
BACKEND = "c" if backend.__name__.endswith("_fastspan") else "python"
