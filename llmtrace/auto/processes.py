"""Processes named as the program names them: a multiprocessing child records under its
`Process.name` ("model-worker-1") instead of "python-<pid>-child", from the first line of
its target on (its spool file is renamed, losing nothing)."""
from __future__ import annotations

from .. import sink
from .patching import on_import, replace


def _named(orig):
    def _bootstrap(self, *args, **kwargs):
        running = sink.current()
        if running is not None:
            running.rename(self.name)
        return orig(self, *args, **kwargs)

    return _bootstrap


def install() -> None:
    on_import("multiprocessing.process", lambda mod: replace(mod.BaseProcess, "_bootstrap", _named))
