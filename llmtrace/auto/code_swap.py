"""Wrapping a Python function wherever the program holds it: a module global, a class
attribute, a closure in a running loop's locals, a bound method kept in a variable. Its
`__code__` is swapped for a wrapper's, which calls a copy of the function (the original
code, globals, defaults and closure cells) through `around(call, args, kwargs)`; the
function object stays the one the program holds, so every later call goes through the
wrapper, however it was reached. The wrapper has the same free variables (a function's
closure cannot change; CPython sorts the names, so the same names give the same order)
and reaches `around` through a keyword-only default that no caller passes. Its code is
named frame_labels.WRAPPER: a stack sample in it is llmtrace's time, not the program's."""

from __future__ import annotations

import gc
import inspect
import sys
import types
from collections.abc import Callable
from typing import Any

from ..decorator import TRACED
from ..frame_labels import WRAPPER
from .patching import remember

_CALL = "__llmtrace_call"
Around = Callable[[Callable[..., Any], tuple[Any, ...], dict[str, Any]], Any]


def functions_named(module: str, qualname: str) -> list[types.FunctionType]:
    """The live function objects of `module`'s `qualname` (a closure has one per enclosing
    call). One pass over the collector's objects: only when a function is chosen."""
    return [
        o
        for o in gc.get_objects()
        # type(), not isinstance(): that asks a foreign object for its __class__, which may warn
        # (torch.distributed.reduce_op) or run code
        if type(o) is types.FunctionType and o.__qualname__ == qualname and o.__module__ == module
    ]


def swappable(fn: types.FunctionType) -> bool:
    """A plain function not timed already (swapped, or decorated with @llmtrace.trace): a
    generator's or a coroutine's call only makes the object."""
    return (
        not (inspect.isgeneratorfunction(fn) or inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn))
        and _CALL not in (fn.__kwdefaults__ or {})
        and fn not in TRACED
    )


def _wrapper_code(freevars: tuple[str, ...]) -> types.CodeType:
    cells = "".join(f"    {v} = None\n" for v in freevars)
    uses = f"        if False:\n            ({', '.join(freevars)},)\n" if freevars else ""  # free, never read
    src = (
        f"def _outer():\n{cells}"
        f"    def _wrapper(*__llmtrace_args, {_CALL}, **__llmtrace_kwargs):\n{uses}"
        f"        return {_CALL}(__llmtrace_args, __llmtrace_kwargs)\n"
        "    return _wrapper\n"
    )
    ns: dict[str, Any] = {}
    exec(compile(src, "<llmtrace code_swap>", "exec"), ns)
    code: types.CodeType = ns["_outer"]().__code__
    assert code.co_freevars == freevars
    code = code.replace(co_name=WRAPPER)  # its samples are llmtrace's, not the program's
    return code.replace(co_qualname=WRAPPER) if sys.version_info >= (3, 11) else code


def swap(fn: types.FunctionType, around: Around) -> Callable[[], None]:
    """From the next call on, `fn(*a, **k)` is `around(original, a, k)`; undone by the
    function returned, or by patching.restore()."""
    original = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    original.__kwdefaults__ = fn.__kwdefaults__
    original.__qualname__ = fn.__qualname__

    def call(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return around(original, args, kwargs)

    # the default first, then the code; put back in the other order (patching.restore)
    remember(fn, "__kwdefaults__", fn.__kwdefaults__)
    fn.__kwdefaults__ = {**(fn.__kwdefaults__ or {}), _CALL: call}
    code, kwdefaults = fn.__code__, original.__kwdefaults__
    remember(fn, "__code__", code)
    fn.__code__ = _wrapper_code(code.co_freevars)

    def undo() -> None:
        fn.__code__ = code
        fn.__kwdefaults__ = kwdefaults

    return undo
