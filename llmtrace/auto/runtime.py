"""Python-level costs every stack can have: log records (`logging`: Logger._log runs only
for enabled levels, with formatting and handlers), sleeps (`sleep`: time.sleep,
asyncio.sleep; a sleep inside a step is a polling loop), and serialization (`serialize`:
json, pickle, msgpack, orjson encode and decode)."""

from __future__ import annotations

import functools
import logging
import time

from .. import names, recorder
from .caller import caller, name_if_slow
from .patching import on_import, replace


def _spanned(name: str, stage: str):
    """A span that names its caller: the C encoders hold the GIL (no stack sample ever
    lands inside them) and a log record's cost is the program's call, not logging's."""

    def wrap(orig):
        @functools.wraps(orig)
        def call(*args, **kwargs):
            if not recorder.is_enabled():
                return orig(*args, **kwargs)
            with recorder.span(name, stage=stage) as sp:
                try:
                    return orig(*args, **kwargs)
                finally:
                    name_if_slow(sp)

        return call

    return wrap


def _async_sleep(orig):
    """`await asyncio.sleep(d)`; not sleep(0): that only yields to the other tasks, and their
    work is what the time holds, no sleep a fix could remove."""

    @functools.wraps(orig)
    async def sleep(delay, *args, **kwargs):
        if not recorder.is_enabled() or not delay or delay <= 0:
            return await orig(delay, *args, **kwargs)
        with recorder.span("sleep.async", stage=names.SLEEP, **{names.A_CALLER: caller()}):  # before the await
            return await orig(delay, *args, **kwargs)

    return sleep


def _patch_encoders(mod, pairs) -> None:
    for attr, name in pairs:
        replace(mod, attr, _spanned(name, names.SERIALIZE))


def install() -> None:
    replace(logging.Logger, "_log", _spanned("logging", names.LOGGING))
    replace(time, "sleep", _spanned("sleep", names.SLEEP))
    on_import("asyncio.tasks", lambda mod: replace(mod, "sleep", _async_sleep))
    on_import("asyncio", lambda mod: replace(mod, "sleep", _async_sleep))
    codecs = (("dumps", "serialize.encode"), ("loads", "serialize.decode"))
    for module in ("json", "pickle", "orjson"):  # patched where the program uses them; llmtrace unpickles nothing
        on_import(module, lambda mod: _patch_encoders(mod, codecs))
    on_import(
        "msgpack", lambda mod: _patch_encoders(mod, (("packb", "serialize.encode"), ("unpackb", "serialize.decode")))
    )
