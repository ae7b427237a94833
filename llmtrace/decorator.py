"""`@llmtrace.trace`: spans around sync, async, generator and async-generator functions."""

from __future__ import annotations

import contextvars
import functools
import inspect
import weakref
from collections.abc import AsyncGenerator, Callable, Generator
from time import perf_counter_ns
from typing import Any, TypeVar, cast, overload

from . import names, recorder
from .spool_format import SPAN

USER_STAGE = "user"
# the functions a span already times: automatic instrumentation leaves them alone (the C
# wrapper of a sync function adds no frame, so a stack sample cannot tell it is there)
TRACED: weakref.WeakSet[Callable[..., Any]] = weakref.WeakSet()
F = TypeVar("F", bound=Callable[..., Any])
Token = contextvars.Token[tuple[int, int]]


def _stage_of(name: str) -> str:
    return name.split(".", 1)[0]


@overload
def trace(fn: F, /) -> F: ...


@overload
def trace(fn: str | None = None, /, name: str | None = None, *, stage: str | None = None) -> Callable[[F], F]: ...


def trace(fn: F | str | None = None, /, name: str | None = None, *, stage: str | None = None) -> F | Callable[[F], F]:
    """Decorate a function with a span.

    @trace                      name = qualified name, stage "user"
    @trace("tokenize")          name "tokenize", stage = first dotted part of the name
    @trace(stage="sampling")    name = qualified name, stage "sampling"
    """
    if isinstance(fn, str):
        fn, name = None, fn
    if fn is not None:
        return _wrap(fn, name, stage)
    return lambda f: _wrap(f, name, stage)


def _wrap(fn: F, name: str | None, stage: str | None) -> F:
    if name is None:
        name = fn.__qualname__
        stage = stage or USER_STAGE
    stage = stage or _stage_of(name)
    try:
        TRACED.add(fn)
    except TypeError:  # a callable that takes no weak reference (a builtin)
        pass
    wrapper: Callable[..., Any]
    if inspect.iscoroutinefunction(fn):
        wrapper = _wrap_async(fn, name, stage)
    elif inspect.isasyncgenfunction(fn):
        wrapper = _wrap_async_gen(fn, name, stage)
    elif inspect.isgeneratorfunction(fn):
        wrapper = _wrap_gen(fn, name, stage)
    elif stage == names.FORWARD:
        wrapper = _wrap_model(fn, name, stage)
    else:
        return cast(F, functools.update_wrapper(recorder.traced(fn, name, stage), fn))
    return cast(F, functools.wraps(fn)(wrapper))


def batch_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """A model call's batch: the leading dimension of its first array argument (an ndarray,
    a tensor, a jax array), as the span attr that makes the tokens of its step."""
    for v in (*args, *kwargs.values()):
        shape = getattr(v, "shape", None)
        if isinstance(shape, tuple) and shape and isinstance(shape[0], int):
            return {names.A_BATCH: shape[0]}
    return {}


def _wrap_model(fn: Callable[..., Any], name: str, stage: str) -> Callable[..., Any]:
    """A `forward` span with its batch (batch_of): without it a step the model cadence
    infers counts one token."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not recorder.is_enabled():
            return fn(*args, **kwargs)
        with recorder.span(name, stage=stage, **batch_of(args, kwargs)):
            return fn(*args, **kwargs)

    return wrapper


def _wrap_async(fn: Callable[..., Any], name: str, stage: str) -> Callable[..., Any]:
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        with recorder.span(name, stage=stage):
            return await fn(*args, **kwargs)

    return wrapper


class _Lifetime:
    """One span from a generator's first resume to its end; current only while it runs."""

    __slots__ = ("name_id", "stage_id", "span_id", "parent", "step", "t0", "failed")

    def __init__(self, name: str, stage: str):
        self.name_id, self.stage_id = recorder.intern(name), recorder.intern(stage)
        self.span_id, self.t0, self.failed, self.parent, self.step = 0, 0, False, 0, -1

    def resume(self) -> Token | None:
        if not self.span_id:
            if not recorder.is_enabled():
                return None
            self.parent, self.step = recorder.current()
            self.span_id, self.t0 = recorder.new_span_id(), perf_counter_ns()
        return recorder.set_current(self.span_id, self.step)

    def suspend(self, token: Token | None) -> None:
        if token is not None:
            recorder.reset_current(token)

    def finish(self) -> None:
        if self.span_id:
            recorder.emit(
                SPAN,
                self.name_id,
                self.stage_id,
                self.t0,
                perf_counter_ns(),
                self.span_id,
                self.parent,
                0,
                self.step,
                None,
                1 if self.failed else 0,
            )


def _wrap_gen(fn: Callable[..., Generator[Any, Any, Any]], name: str, stage: str) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Generator[Any, Any, Any]:
        life = _Lifetime(name, stage)
        gen = fn(*args, **kwargs)
        send, value = gen.send, None
        exc: BaseException | None = None
        try:
            while True:
                tok = life.resume()
                try:
                    out = gen.throw(exc) if exc is not None else send(value)
                except StopIteration as stop:
                    return stop.value
                except BaseException:
                    life.failed = True
                    raise
                finally:
                    life.suspend(tok)
                value, exc = None, None
                try:
                    value = yield out
                except GeneratorExit:
                    gen.close()
                    raise
                except BaseException as e:
                    exc = e
        finally:
            life.finish()

    return wrapper


def _wrap_async_gen(fn: Callable[..., AsyncGenerator[Any, Any]], name: str, stage: str) -> Callable[..., Any]:
    async def wrapper(*args: Any, **kwargs: Any) -> AsyncGenerator[Any, Any]:
        life = _Lifetime(name, stage)
        agen = fn(*args, **kwargs)
        value = None
        exc: BaseException | None = None
        try:
            while True:
                tok = life.resume()
                try:
                    out = await (agen.athrow(exc) if exc is not None else agen.asend(value))
                except StopAsyncIteration:
                    return
                except BaseException:
                    life.failed = True
                    raise
                finally:
                    life.suspend(tok)
                value, exc = None, None
                try:
                    value = yield out
                except GeneratorExit:
                    await agen.aclose()
                    raise
                except BaseException as e:
                    exc = e
        finally:
            life.finish()

    return wrapper
