"""Automatic instrumentation: spans with the taxonomy's stage names at the boundaries
every serving stack has, recorded by the same recorder as the user's own spans.

    llmtrace.instrument()      # in-process; `llmtrace record` does it in every process
                               # of the program unless --no-auto

transport.py  sockets (tcp / ipc), multiprocessing connections and queues, pyzmq
runtime.py    logging, time.sleep / asyncio.sleep, json / pickle / msgpack / orjson
torch_model.py  outermost nn.Module call (forward), host<-device copies and syncs (sync.wait)
libraries.py  tokenizers (tokenize / detokenize), http.server / aiohttp / Starlette requests
processes.py  multiprocessing children record under their Process.name
handoff.py    objects handed between threads by queue.Queue / asyncio.Queue (request -> step links)
hot_loop.py   a model llmtrace has no patch for: the step loop's busiest call, found by the
              stack sampler while the program runs, timed as `forward`

Each patch replaces one attribute once (patching.py), keeps the original's behaviour and
exceptions, records nothing while recording is off, and a library that is not installed
is simply never patched (patches wait for the module's import).
"""

from __future__ import annotations

from . import handoff, hot_loop, libraries, patching, processes, runtime, torch_model, transport

GROUPS = {
    "transport": transport,
    "runtime": runtime,
    "torch": torch_model,
    "libraries": libraries,
    "processes": processes,
    "handoff": handoff,
    "hot_loop": hot_loop,
}
_installed: set[str] = set()


def instrument(groups=None) -> list[str]:
    """Patch the boundaries of `groups` (default all: transport, runtime, torch,
    libraries, processes, handoff, hot_loop); returns the groups newly installed."""
    wanted = list(GROUPS if groups is None else groups)
    unknown = [g for g in wanted if g not in GROUPS]
    if unknown:
        raise ValueError(f"unknown instrumentation group {unknown[0]!r}; choose from {', '.join(GROUPS)}")
    new = [g for g in wanted if g not in _installed]
    for g in new:
        GROUPS[g].install()
        _installed.add(g)
    return new


def uninstrument() -> None:
    """Undo every patch (patches still waiting for an import are dropped too)."""
    patching.restore()
    patching.clear_pending()
    hot_loop.uninstall()
    _installed.clear()
