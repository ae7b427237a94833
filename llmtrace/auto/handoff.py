"""Hand-offs between the threads (or tasks) of one process: an object put on a queue.Queue
or an asyncio.Queue by code inside a span (an HTTP handler's request) and taken by another
thread or task (the step loop). The put records a `handoff.put` instant (its parent: the
putter's innermost span) and the get of that same object a `handoff.get` instant with the
same key, so the analyzer can tell which steps served which request without the program
naming its requests (analyze/request_steps.py). Objects are matched by identity: a put
keeps its object until the get (at most MAX_PENDING at once, the oldest forgotten past
that; an object put twice before its get is matched once). queue.SimpleQueue (C) and
multiprocessing queues (the object is copied) are not matched."""

from __future__ import annotations

import functools
import itertools

from .. import names, recorder
from .patching import on_import, replace

MAX_PENDING = 4096
_pending: dict[int, tuple[object, int]] = {}  # id(object) -> (the object, its key)
_keys = itertools.count(1)


def _putter(orig):
    @functools.wraps(orig)
    def put(q, item, *args, **kwargs):
        if not recorder.is_enabled() or not recorder.current()[0]:  # outside any span: nothing to link
            return orig(q, item, *args, **kwargs)
        key = next(_keys)
        _pending[id(item)] = (item, key)  # one dict operation: atomic under the GIL, no lock needed
        if len(_pending) > MAX_PENDING:
            _forget_oldest()
        recorder.instant(names.I_HANDOFF_PUT, **{names.A_HANDOFF: key})  # before: the get may come first
        try:
            return orig(q, item, *args, **kwargs)
        except BaseException:  # queue.Full, QueueFull: never handed off
            _pending.pop(id(item), None)
            raise

    return put


def _forget_oldest() -> None:
    try:
        del _pending[next(iter(_pending))]
    except (RuntimeError, KeyError, StopIteration):  # another thread changed it meanwhile: next time
        pass


def _getter(orig):
    @functools.wraps(orig)
    def get(q, *args, **kwargs):
        item = orig(q, *args, **kwargs)
        if _pending and recorder.is_enabled():
            entry = _pending.pop(id(item), None)
            if entry is not None and entry[0] is item:
                recorder.instant(names.I_HANDOFF_GET, **{names.A_HANDOFF: entry[1]})
        return item

    return get


def _patch(queue_class, put: str, get: str) -> None:
    replace(queue_class, put, _putter)
    replace(queue_class, get, _getter)


def install() -> None:
    # queue: put_nowait calls put, get_nowait get; LifoQueue and PriorityQueue inherit them
    on_import("queue", lambda mod: _patch(mod.Queue, "put", "get"))
    # asyncio: `await q.put()` ends in put_nowait, `await q.get()` in get_nowait
    on_import("asyncio.queues", lambda mod: _patch(mod.Queue, "put_nowait", "get_nowait"))
