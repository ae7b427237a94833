"""What a sampled frame label ('module:qualname:LINE', the stack samplers' format) says:
its function, its source line, whether the thread was waiting there, whether it is the
profiled program's own code. Shared by the analyzer and by what reads samples while the
program runs (auto/hot_loop.py)."""

from __future__ import annotations

import functools
import importlib.util
import linecache
import re
import sys
import sysconfig

# the name of the code llmtrace wraps a program's function in (auto/code_swap.py): its frames
# carry the program's module but are llmtrace's
WRAPPER = "<llmtrace>"

# functions that wait rather than work: a stage "spending time" there is blocked
IDLE = re.compile(
    r"(^|\.)(select|poll|epoll|wait|wait_for|sleep|acquire|recv|recv_into|accept|_run_once"
    r"|run_forever|run_until_complete)(:\d+)?$"
)


def frame_function(frame: str) -> str:
    """'module:Class.func:123' (sampler label) -> 'module:Class.func' (module and qualified
    name apart: what finds the function object)."""
    head, _, tail = frame.rpartition(":")
    return head if tail.isdigit() and head else frame


@functools.lru_cache(maxsize=1 << 16)
def frame_name(frame: str) -> str:
    """'module:Class.func:123' (sampler label) -> 'module.Class.func'."""
    return frame_function(frame).replace(":", ".")


# a leaf line that blocks in C (no frame of its own): a queue's get, a wait, a join, a
# lock (acquired, or entered by `with`), a receive (not dict.get or str.join: those always
# take an argument)
_BLOCKING_CALL = re.compile(
    r"\.(?:get|join|result)\(\s*(?:\)|block\s*=|timeout\s*=|True\b|False\b)"
    r"|\.(?:wait|wait_for|acquire|recv|recv_into|recvfrom|accept|poll|select)\s*\("
    r"|\bsleep\s*\("
    r"|^\s*(?:async\s+)?with\b[^:#]*\b\w*(?:lock|Lock|mutex|semaphore)\b"
)  # entering a lock


@functools.lru_cache(maxsize=1 << 14)
def is_idle_sample(stack: tuple[str, ...], main_file: str = "") -> bool:
    """Whether a sampled thread was blocked, not working: its innermost frame is a wait
    (select, poll, sleep, acquire, ...) or its line calls one that has no Python frame
    (`work_queue.get(block=True)` in a thread pool's idle worker)."""
    if not stack:
        return False
    leaf = stack[-1]
    return bool(IDLE.search(frame_name(leaf)) or _BLOCKING_CALL.search(source_line(leaf, main_file)))


def source_line(frame: str, main_file: str) -> str:
    """The source text of a sampled frame 'module:func:LINE' ('' without a line or file);
    `main_file`: the sampled process's __main__ (not this one's)."""
    path, line = frame_file(frame, main_file)
    return linecache.getline(path, line) if path else ""


def frame_file(frame: str, main_file: str) -> tuple[str, int]:
    """(source file, line) of a sampled frame 'module:func:LINE'; ('', 0) when unknown."""
    parts = frame.split(":")
    if len(parts) < 3 or not parts[-1].isdigit():
        return "", 0
    path = main_file if parts[0] == "__main__" else module_file(parts[0])
    return path, int(parts[-1])


@functools.lru_cache(maxsize=1 << 10)
def module_file(module: str) -> str:
    mod = sys.modules.get(module)
    path = getattr(mod, "__file__", None)
    if path is None:
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            spec = None
        path = spec.origin if spec is not None and spec.origin else ""
    return path


@functools.lru_cache(maxsize=1 << 12)
def _origin(top: str) -> str:
    """Where a top-level module is loaded from ('' when this interpreter cannot find it)."""
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        spec = None
    return (spec.origin or "") if spec is not None else ""


def _top(name: str) -> str:
    return name.split(":", 1)[0].split(".", 1)[0]


@functools.lru_cache(maxsize=1 << 12)
def is_user_code(name: str) -> bool:
    """A function of the profiled program itself, not of the standard library, an installed
    package or llmtrace: where a finding's fix goes. Judged by its top-level package; one
    this interpreter cannot find is taken for the program's own."""
    if WRAPPER in name:
        return False
    top = _top(name)
    if top == "__main__":
        return True
    if is_standard(name):
        return False
    origin = _origin(top)
    return not ("site-packages" in origin or "dist-packages" in origin)


@functools.lru_cache(maxsize=1 << 12)
def is_standard(name: str) -> bool:
    """A function of the standard library, the interpreter's frozen modules, or llmtrace."""
    if WRAPPER in name:
        return True
    top = _top(name)
    if top == "__main__":
        return False
    if top in ("llmtrace", "<frozen") or top in sys.stdlib_module_names:
        return True
    origin = _origin(top)
    return origin.startswith(_STDLIB) or origin in ("built-in", "frozen")


_STDLIB = sysconfig.get_paths()["stdlib"]
