"""The recorder backend: the C accelerator when it is built, else the pure-Python reference.

Both expose the same functions (see `_pyrecorder`, whose signatures are the typed API: the
C module mirrors them, tests/test_recorder.py runs both) and write the same 112-byte
records. Set LLMTRACE_PURE_PYTHON=1 to force the Python one (the tests run both).
"""

import os
from types import ModuleType
from typing import TYPE_CHECKING


def _load() -> ModuleType:
    if os.environ.get("LLMTRACE_PURE_PYTHON") != "1":
        try:
            from . import _fastspan  # type: ignore[attr-defined]

            return _fastspan  # type: ignore[no-any-return]
        except ImportError:
            pass
    from . import _pyrecorder

    return _pyrecorder


if TYPE_CHECKING:
    from . import _pyrecorder as backend
else:
    backend = _load()

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
