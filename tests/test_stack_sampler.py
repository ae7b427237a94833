"""The in-process stack sampler (llmtrace/stack_sampler.py): a tick names each thread's
functions, and on CPython 3.11 no tick walks frames while a thread is importing."""

from __future__ import annotations

import importlib._bootstrap
import sys

import pytest
from synthetic import drain_recorded_trace

import llmtrace
from llmtrace import stack_sampler


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
        assert sys.getswitchinterval() <= 0.0005
    finally:
        stack_sampler.stop()
        sys.setswitchinterval(switch)
