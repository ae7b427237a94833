"""The in-process stack sampler (llmtrace/stack_sampler.py): a tick names each thread's
functions; the GIL-free reader (llmtrace/_frames.c) sees pure Python where it runs and
names an address only through a live object; on CPython 3.11 no GIL-reader tick walks
frames while a thread is importing."""

from __future__ import annotations

import hashlib
import importlib._bootstrap
import os
import sys
import threading
import time
import types

import pytest
from synthetic import drain_recorded_trace

import llmtrace
from llmtrace import native_stacks, stack_sampler


@pytest.fixture
def recording():
    llmtrace.configure(enabled=True, propagate=False)
    drain_recorded_trace()
    yield
    drain_recorded_trace()


def test_a_tick_records_this_threads_stack(recording):
    assert stack_sampler.StackSampler().sample_once() >= 1
    samples = drain_recorded_trace().samples
    assert any("test_a_tick_records_this_threads_stack" in ";".join(s.stack) for s in samples)


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="the import guard is for CPython 3.11's frame race")
def test_no_tick_while_a_thread_imports(recording):
    sampler = stack_sampler.StackSampler()
    with importlib._bootstrap._ModuleLockManager("llmtrace_test_module_being_imported"):
        assert stack_sampler.importing()
        assert sampler.sample_once() == 0
    assert not stack_sampler.importing()
    assert sampler.sample_once() >= 1
    kept = importlib._bootstrap._get_module_lock("llmtrace_test_module_imported_before")  # held by nobody
    assert not stack_sampler.importing() and kept is not None


def test_a_running_sampler_takes_the_rate_asked_for_next():
    """configure(sample_hz=...) after the environment (or an earlier configure) started a
    sampler: the rate asked for last is the rate (it stayed at the first one: a recording
    at 1000 Hz sampled at 250 Hz and its hot function went unreported)."""
    switch = sys.getswitchinterval()
    try:
        first = stack_sampler.start(0.004)
        assert stack_sampler.start(0.001) is first and first.interval_s == 0.001
        # the GIL reader's switch interval follows the rate; the GIL-free reader leaves it alone
        assert sys.getswitchinterval() == (switch if first.native is not None else min(switch, 0.0005))
    finally:
        stack_sampler.stop()
        sys.setswitchinterval(switch)


frames = native_stacks.reader()
needs_frames = pytest.mark.skipif(frames is None, reason="llmtrace._frames is not built for this Python")


def _pure_python(n: int = 20000) -> int:
    x = 0
    for i in range(n):
        x += i
    return x


@needs_frames
def test_a_gil_free_tick_sees_pure_python_before_a_call_that_releases_the_gil(recording):
    """The bias the GIL-free read removes: a pure-Python function followed by a call that
    releases the GIL (hashlib on 2 MB). Read under the GIL, the function's samples land in
    the call after it (0 of ~150 samples in it while it took a third of the time); read
    without the GIL, it gets about its share."""
    sampler = stack_sampler.StackSampler(0.002)
    assert sampler.native is not None
    data, spent = b"x" * 2_000_000, [0.0, 0.0]
    stop = threading.Event()

    def work():
        while not stop.is_set():
            t0 = time.perf_counter()
            _pure_python()
            t1 = time.perf_counter()
            hashlib.sha256(data).digest()
            spent[0] += t1 - t0
            spent[1] += time.perf_counter() - t1

    worker = threading.Thread(target=work)
    worker.start()
    sampler.start()
    stacks: list[tuple[str, ...]] = []
    deadline = time.monotonic() + 10  # a loaded machine gives the sampler fewer ticks
    try:
        while len(stacks) < 150 and time.monotonic() < deadline:
            time.sleep(0.3)
            stacks += [s.stack for s in drain_recorded_trace().samples if s.tid == worker.native_id]
    finally:
        sampler.stop()
        stop.set()
        worker.join()
    in_pure = sum(1 for st in stacks if ":_pure_python:" in st[-1])
    in_work = sum(1 for st in stacks if ".<locals>.work:" in st[-1])
    share, truth = in_pure / max(1, in_pure + in_work), spent[0] / sum(spent)
    assert in_pure + in_work >= 100
    assert 0.5 * truth <= share <= 1.5 * truth, (share, truth)


@needs_frames
def test_a_gil_free_tick_names_other_threads_frames_with_their_lines(recording):
    started, stop = threading.Event(), threading.Event()

    def waiting_here():
        started.set()
        stop.wait()

    t = threading.Thread(target=waiting_here)
    t.start()
    started.wait()
    try:
        assert stack_sampler.StackSampler().sample_native(0) >= 2
    finally:
        stop.set()
        t.join()
    (stack,) = [s.stack for s in drain_recorded_trace().samples if s.tid == t.native_id]
    assert stack[-1].startswith("threading:Condition.wait:")
    assert any(
        f.startswith(
            f"{__name__}:test_a_gil_free_tick_names_other_threads_frames_with_their_lines.<locals>.waiting_here:"
        )
        for f in stack
    )


@needs_frames
def test_an_address_is_named_only_while_a_live_object_of_its_type_is_there():
    code = _pure_python.__code__
    assert frames.object_at(id(code), types.CodeType) is code
    frozen = os.path.join.__code__  # deep-frozen at startup: immortal on 3.12 (refcount 2**32 - 1)
    assert frames.object_at(id(frozen), types.CodeType) is frozen
    assert frames.object_at(id(code), dict) is None  # another type
    assert frames.object_at(0, types.CodeType) is None
    assert frames.object_at(8, types.CodeType) is None  # unmapped: the read fails, nothing crashes
    buf = bytearray(64)  # bytes that are no object at all
    assert frames.object_at(id(buf) + 32, types.CodeType) is None


@needs_frames
def test_gil_free_ticks_survive_stacks_that_change_while_they_are_read(recording):
    """Threads that call, return and resume generators without pause: a read sees frames
    popped and reused under it (torn reads: a `previous` of 0xffff..., a code address that
    is now a list). Every tick must return, and every name come from a live code object."""
    stop = threading.Event()

    def churn(depth: int) -> int:
        if depth == 0:
            return sum(x for x in (i * i for i in range(20)))
        return churn(depth - 1) + 1

    def work(seed: int) -> None:
        k = seed
        while not stop.is_set():
            k = (k * 1103515245 + 12345) % 2**31
            churn(k % 40)

    workers = [threading.Thread(target=work, args=(s,)) for s in (1, 2)]
    for w in workers:
        w.start()
    sampler, switch = stack_sampler.StackSampler(), sys.getswitchinterval()
    sys.setswitchinterval(0.0002)  # the tick gets the GIL back soon after each read
    try:
        ticks = sum(sampler.sample_native(0) for _ in range(2000))
    finally:
        sys.setswitchinterval(switch)
        stop.set()
        for w in workers:
            w.join()
    stacks = [s.stack for s in drain_recorded_trace().samples]
    assert ticks > 2000 and len(stacks) == ticks
    assert all(frame.count(":") >= 2 for st in stacks for frame in st)


@needs_frames
def test_naming_a_stack_survives_the_tables_starting_over_midway(monkeypatch):
    """Past MAX_KNOWN the tables start over, possibly while a stack's frames are being
    named: the stack must still come out whole (it raised KeyError, which ended the
    GIL-free reader for the rest of the run)."""
    monkeypatch.setattr(native_stacks, "MAX_KNOWN", 2)
    stacks = native_stacks.NativeStacks(frames)
    _, rows = stacks.snapshot(0, 48, ())
    (raw,) = [raw for tid, raw in rows if tid == threading.get_native_id()]
    labels = stacks.labels(raw)
    assert labels is not None and len(labels) == len(raw) // native_stacks.FRAME.size > 2
    assert any("test_naming_a_stack_survives" in label for label in labels)
