"""The model of a program llmtrace has no patch for (numpy, onnxruntime, a C extension's
binding): read from the stack samples while the program runs, then timed exactly.

Every serving loop calls its model once per step, and that call is most of the loop's
time. The sampler's watcher (stack_sampler.watch) looks at the last stacks of each thread:
from the outermost frame down it follows the function most samples are in, until the
program's own function that spends some of its time outside its busiest callee (the loop
body: the step's other work) while that callee, the program's own or an installed
package's (onnxruntime's session.run, a binding's Python method), holds at least
MODEL_SHARE of the thread's wall time. That callee's live function objects (found by
module and qualified name: module functions, methods, closures) get a wrapper recording a
`forward` span (attr `fn`, `inferred`, and `batch`: the first array argument's leading
dimension) through code_swap.py, which reaches the calls of a loop already running: from
then on the analyzer's model cadence finds the steps, and the work between model calls is
the step's overhead. A chosen call that is not called again (a warm-up, a pool worker's
initializer) is put back after a few seconds and never chosen again.

A program whose model llmtrace already times (a torch module, a span of the user's) shows
llmtrace's or torch's frames under that callee and is left alone, as is one whose loop has
no such call (the model inlined in the loop body, a C function called from the loop's own
line). One function per process, at most; the report names it.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

from .. import names, recorder, stack_sampler
from ..decorator import batch_of
from ..frame_labels import frame_function, frame_name, is_idle_sample, is_standard, is_user_code
from . import code_swap

CHECK_S = 1.0
MIN_SAMPLES = 100  # ticks of one thread before its stacks are judged (0.4 s at 250 Hz, more with many threads)
MODEL_SHARE = 0.3  # of the thread's ticks inside the callee: a model, not a helper
OUTSIDE_SHARE = 0.01  # of the loop's busy ticks outside its busiest callee: a loop body
MIN_CALLS = 3  # calls of a chosen function, within TRIAL_CHECKS looks, that make it the model
TRIAL_CHECKS = 3
_OURS = "llmtrace"  # a decorator's or a patch's frame: the program's spans are there already
_UNTIMED = "llmtrace.auto.processes"  # but for a forked child's bootstrap, under all its stacks
_TORCH = "torch."
_IMPORTING = ":<module>:"  # a module's top level: torch imported (by transformers, say), not run
_KNOWN = (_OURS, _TORCH)  # under the call: timed already (the torch patch times modules)
INFERRED = "the step loop's busiest call (stack samples)"

Stacks = Counter[tuple[str, ...]]
_pending: dict[int, Stacks] = {}  # thread -> its stacks gathered since it was last judged
_promoted: list[str] = []  # the call timed in this process (a fork's child inherits it)


def model_call(stacks: Stacks, main_file: str = "") -> str | None:
    """The 'module:qualname' of the call that a thread's stacks show to be its loop's model
    (the module docstring), or None. The loop is the program's own function, or failing
    that a library's that calls the program's (a process pool's worker loop running the
    program's step function)."""
    total = sum(stacks.values())
    busy = [(st, n) for st, n in stacks.items() if st and not is_idle_sample(st, main_file)]
    in_library: str | None = None  # the outermost library loop's call of the program's
    for fn, fn_n, callee, callee_n, inside, depth in _dominant_chain(busy):
        if fn.startswith(_OURS) and not fn.startswith(_UNTIMED):
            return None
        if callee_n > fn_n * (1 - OUTSIDE_SHARE) or callee_n < MODEL_SHARE * total:
            continue
        if any(f.startswith(_KNOWN) for st in inside for f in st[depth + 1 :]):
            return None  # timed already
        if is_user_code(fn) and not is_standard(callee):
            return callee
        if in_library is None and is_user_code(callee):
            in_library = callee
    return in_library


Link = tuple[str, int, str, int, list[tuple[str, ...]], int]


def _dominant_chain(busy: list[tuple[tuple[str, ...], int]]) -> Iterator[Link]:
    """From the outermost frame down, the function most samples are in and its busiest
    callee: (function, its samples, callee, the callee's samples, the stacks in the callee,
    depth)."""
    chain, depth = busy, 0
    while chain:
        here = Counter[str]()
        for st, n in chain:
            if len(st) > depth:
                here[frame_function(st[depth])] += n
        if not here:
            return
        fn, fn_n = here.most_common(1)[0]
        chain = [(st, n) for st, n in chain if len(st) > depth and frame_function(st[depth]) == fn]
        below = Counter[str]()
        for st, n in chain:
            if len(st) > depth + 1:
                below[frame_function(st[depth + 1])] += n
        if not below:
            return
        callee, callee_n = below.most_common(1)[0]
        inside = [st for st, _ in chain if len(st) > depth + 1 and frame_function(st[depth + 1]) == callee]
        yield fn, fn_n, callee, callee_n, inside, depth
        depth += 1


def _forward(function: str) -> code_swap.Around:
    attrs: dict[str, Any] = {names.A_FUNCTION: frame_name(function), names.A_INFERRED: INFERRED}

    def around(original: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        _trial.calls += 1
        if not recorder.is_enabled():
            return original(*args, **kwargs)
        with recorder.span(names.FORWARD, **attrs, **batch_of(args, kwargs)):
            return original(*args, **kwargs)

    return around


class _Trial:
    """The call being timed as the model until it proves itself one: called MIN_CALLS
    times within TRIAL_CHECKS looks (a warm-up phase, a worker's initializer, is called
    once and is put back, never chosen again)."""

    def __init__(self) -> None:
        self.function = ""
        self.calls = 0
        self.looks = 0
        self.undo: list[Callable[[], None]] = []
        self.rejected: set[str] = set()

    def start(self, function: str) -> bool:
        """Time every live function 'module:qualname'; False where none can be (a
        generator, a coroutine, a lambda made again each time)."""
        module, _, qualname = function.partition(":")
        fns = [f for f in code_swap.functions_named(module, qualname) if code_swap.swappable(f)]
        self.undo = [code_swap.swap(fn, _forward(function)) for fn in fns]
        self.function = function if fns else ""
        self.calls = self.looks = 0
        return bool(fns)

    def judge(self) -> bool | None:
        """True: the model; False: put back; None: not yet known."""
        self.looks += 1
        if self.calls >= MIN_CALLS:
            return True
        if self.looks < TRIAL_CHECKS:
            return None
        for undo in self.undo:
            undo()
        self.rejected.add(self.function)
        self.function = ""
        return False


_trial = _Trial()


def _runs_torch(by_thread: dict[int, Stacks]) -> bool:
    """torch code ran here: the torch patch times this process's model (its module calls),
    and another thread's busy loop (a tokenizer's, a preprocessor's) is no model."""
    return any(
        f.startswith(_TORCH) and _IMPORTING not in f for stacks in by_thread.values() for st in stacks for f in st
    )


def check(by_thread: dict[int, Stacks]) -> bool:
    """The watcher: True once a model call is timed (or was, before a fork)."""
    if _promoted or _runs_torch(by_thread):
        return True
    if _trial.function:
        if _trial.judge():
            _promoted.append(_trial.function)
            return True
        return False
    main_file = getattr(sys.modules.get("__main__"), "__file__", None) or ""
    for tid, stacks in by_thread.items():
        gathered = _pending.setdefault(tid, Counter())
        gathered.update(stacks)
        if sum(gathered.values()) < MIN_SAMPLES:
            continue
        del _pending[tid]  # judged on its latest stacks only: a phase (import, warm-up) passes
        function = model_call(gathered, main_file)
        if function is not None and function not in _trial.rejected and _trial.start(function):
            return False
    return False


def install() -> None:
    stack_sampler.watch(check, CHECK_S)


def uninstall() -> None:
    global _trial
    stack_sampler.watch(None)
    _pending.clear()
    _promoted.clear()
    _trial = _Trial()
