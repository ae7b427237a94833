"""Marking the serving loop in one line, for pipelines whose spans carry no step ids:

    for batch in llmtrace.steps(batches):      # each iteration is one step
        ...
    with llmtrace.step(tokens=len(batch)):     # or around the body
        ...

A step is a span named `step` with the next step id of this process; the spans opened
inside it are its stages. `tokens` (output tokens of the step, default one per step in
the report) can also be set later with `.set(tokens=n)` on the span `step()` returns.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

from . import names, recorder

if TYPE_CHECKING:
    from ._pyrecorder import LiveSpan

_ids = itertools.count()
T = TypeVar("T")


def step(tokens: int | None = None, **attrs: Any) -> LiveSpan:
    """A span for one iteration of the serving loop (its step id: the next of this process)."""
    if tokens is not None:
        attrs[names.A_TOKENS] = tokens
    return recorder.span(names.STEP, step=next(_ids), **attrs)


def steps(iterable: Iterable[T], **attrs: Any) -> Iterator[T]:
    """Yield the items of `iterable`; the loop body run for each one is a step."""
    for item in iterable:
        with step(**attrs):
            yield item
