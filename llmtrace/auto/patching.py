"""How automatic instrumentation changes a library: one attribute replaced once, the
original kept for `restore`, and patches for modules not yet imported applied right
after their import (a post-import hook), so `llmtrace record` can patch at interpreter
start whatever the program imports later."""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import threading
from collections.abc import Callable

from .. import recorder

_originals: list[tuple[object, str, object]] = []  # (owner, attribute, original), in patch order
_PATCHED = "__llmtrace_original__"


def replace(owner, attr: str, make: Callable[[object], object]) -> bool:
    """Set owner.attr = make(current) unless it is ours already; False when owner has no
    such attribute (another version of the library). An inherited method (socket's C
    methods) is shadowed on `owner` and unshadowed by `restore`."""
    current = getattr(owner, attr, None)
    if current is None or hasattr(current, _PATCHED):
        return False
    own = attr in vars(owner) if isinstance(owner, type) else True
    wrapper = make(current)
    setattr(wrapper, _PATCHED, current)  # functions and llmtrace's C wrappers have a __dict__
    setattr(owner, attr, wrapper)
    _originals.append((owner, attr, current if own else _INHERITED))
    return True


_INHERITED = object()


def remember(owner: object, attr: str, original: object) -> None:
    """An attribute changed by other means than `replace`, for `restore` (last changed, first
    put back)."""
    _originals.append((owner, attr, original))


def traced(name: str, stage: str) -> Callable[[object], object]:
    """For `replace`: the recorder's C wrapper, a span around each call with no attributes
    (no Python frame added: the cheapest span a patch can add)."""
    return lambda orig: recorder.traced(orig, name, stage)


def restore() -> None:
    """Put every replaced attribute back (tests; `llmtrace.uninstrument()`)."""
    while _originals:
        owner, attr, value = _originals.pop()
        if value is _INHERITED:
            delattr(owner, attr)
        else:
            setattr(owner, attr, value)


# ---------------------------------------------------------------- post-import hooks

_hooks: dict[str, list[Callable]] = {}
_lock = threading.Lock()


def on_import(module: str, patch: Callable) -> None:
    """Run patch(module object) now if `module` is imported, else right after its import."""
    mod = sys.modules.get(module)
    if mod is not None and getattr(mod, "__spec__", None) is not None and not _initialising(mod):
        _run(patch, mod)
        return
    with _lock:
        _hooks.setdefault(module, []).append(patch)
        if not any(isinstance(f, _PostImportFinder) for f in sys.meta_path):
            sys.meta_path.insert(0, _PostImportFinder())


def _initialising(mod) -> bool:
    spec = getattr(mod, "__spec__", None)
    return bool(getattr(spec, "_initializing", False))


def _run(patch: Callable, mod) -> None:
    try:
        patch(mod)
    except Exception as e:  # never break the program's import over instrumentation
        print(f"llmtrace: could not instrument {mod.__name__}: {e!r}", file=sys.stderr)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: asks the other finders, then wraps the loader of a hooked
    module so the patches run once the module's code has."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in _hooks:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                spec.loader = _Loader(spec.loader, fullname)
                return spec
        return None


class _Loader(importlib.abc.Loader):
    def __init__(self, inner, fullname: str):
        self.inner, self.fullname = inner, fullname

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        with _lock:
            patches = _hooks.pop(self.fullname, [])
        for patch in patches:
            _run(patch, module)

    def __getattr__(self, name):  # get_resource_reader, is_package, ... as the real loader has them
        return getattr(self.inner, name)


def clear_pending() -> None:
    with _lock:
        _hooks.clear()
