"""A model llmtrace has no patch for (auto/hot_loop.py): the step loop's busiest call is
read from the stack samples while the program runs and timed as `forward`, so a program
whose model is numpy (or any C extension) gets steps, a breakdown and findings."""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest
from synthetic import drain_recorded_trace

import llmtrace
from llmtrace import names, stack_sampler
from llmtrace.analyze.analysis import Analysis
from llmtrace.auto import hot_loop
from llmtrace.frame_labels import WRAPPER, is_user_code

HERE = __name__


def _stacks(rows: dict[tuple[str, ...], int]) -> Counter[tuple[str, ...]]:
    return Counter(rows)


LOOP = ("threading:Thread._bootstrap:995", "threading:Thread.run:975", f"{HERE}:serve:10")


def test_the_loops_busiest_call_of_the_programs_own_is_the_model():
    stacks = _stacks(
        {
            (*LOOP, f"{HERE}:model:3"): 70,
            (*LOOP, f"{HERE}:model:4"): 10,
            (*LOOP[:-1], f"{HERE}:serve:12", f"{HERE}:pick:7"): 15,
            (*LOOP[:-1], f"{HERE}:serve:13"): 5,
        }
    )
    assert hot_loop.model_call(stacks) == f"{HERE}:model"


def test_no_model_where_the_busiest_call_is_a_small_part_of_the_threads_time():
    """A scheduler thread that mostly waits for its workers: its busiest call is no model."""
    stacks = _stacks(
        {
            (*LOOP, f"{HERE}:schedule:3"): 20,
            (*LOOP[:-1], f"{HERE}:serve:12"): 5,
            (*LOOP[:-1], f"{HERE}:serve:14", "threading:Condition.wait:320"): 75,  # idle
        }
    )
    assert hot_loop.model_call(stacks) is None


def test_a_call_that_llmtrace_or_torch_times_already_is_left_alone():
    stacks = _stacks(
        {
            (*LOOP, f"{HERE}:generate_step:3", "llmtrace.auto.torch_model:__call__:50"): 80,
            (*LOOP[:-1], f"{HERE}:serve:12"): 20,
        }
    )
    assert hot_loop.model_call(stacks) is None


def test_nothing_below_a_span_the_program_records_itself():
    """A model the program decorated is timed: its layers are no model of their own."""
    traced = (*LOOP, "llmtrace.decorator:trace.<locals>.wrap.<locals>.call:80", f"{HERE}:model:3")
    stacks = _stacks({(*traced, f"{HERE}:layer:9"): 70, traced: 10, (*LOOP[:-1], f"{HERE}:serve:12"): 20})
    assert hot_loop.model_call(stacks) is None


def test_an_installed_packages_call_can_be_the_model_and_torch_stops_the_search():
    """onnxruntime's session.run called from the loop is its model; in a process where torch
    runs, the torch patch times the model and no other thread's loop is one."""
    run = "onnxruntime.capi.onnxruntime_inference_collection:InferenceSession.run"
    stacks = _stacks({(*LOOP, f"{run}:220"): 80, (*LOOP[:-1], f"{HERE}:serve:12"): 20})
    assert hot_loop.model_call(stacks) == run
    json_loop = _stacks({(*LOOP, "json:dumps:231"): 80, (*LOOP[:-1], f"{HERE}:serve:12"): 20})
    assert hot_loop.model_call(json_loop) is None  # the standard library's: no model
    importing = _stacks({("__main__:<module>:3", "torch.nn.modules.module:<module>:12"): 1})
    try:
        assert not hot_loop.check({1: importing}) and not hot_loop._promoted  # imported, not run: watch on
    finally:
        hot_loop.uninstall()
    torch_thread = _stacks({("threading:Thread.run:975", "torch.nn.modules.module:Module._call_impl:1501"): 1})
    try:
        assert hot_loop.check({1: torch_thread, 2: stacks}) and not hot_loop._promoted
    finally:
        hot_loop.uninstall()


def test_a_process_pools_worker_loop_calls_the_model():
    """A ProcessPoolExecutor worker (forked: the parent's frames and llmtrace's bootstrap of
    the child are under every stack) runs the program's step function: the library's loop
    is the step loop, and the program's function it calls is the model."""
    fork = (f"{HERE}:main:30", "multiprocessing.popen_fork:Popen._launch:71", "llmtrace.auto.processes:_bootstrap:40")
    worker = (*fork, "multiprocessing.process:BaseProcess.run:108", "concurrent.futures.process:_process_worker:261")
    stacks = _stacks(
        {
            (*worker, f"{HERE}:decode:19"): 80,
            (*worker[:-1], "concurrent.futures.process:_process_worker:250", "pickle:dumps:3"): 15,
            (*worker[:-1], "concurrent.futures.process:_process_worker:240", "threading:Condition.wait:320"): 40,
        }
    )
    assert hot_loop.model_call(stacks) == f"{HERE}:decode"


def test_a_library_loop_is_followed_down_to_the_programs_own():
    """socketserver's loop calls the handler on every request: the loop that matters is
    the program's own, below it."""
    lib = ("socketserver:BaseServer.serve_forever:233", "socketserver:BaseServer._handle_request_noblock:316")
    stacks = _stacks(
        {
            (*lib, f"{HERE}:Handler.handle:20", f"{HERE}:Model.step:5"): 60,
            (*lib, f"{HERE}:Handler.handle:22"): 30,
            (*lib[:-1],): 10,
        }
    )
    assert hot_loop.model_call(stacks) == f"{HERE}:Model.step"


def test_a_swapped_function_is_wrapped_wherever_the_program_holds_it():
    """A closure a running loop holds in a local, a bound method kept in a variable: both
    reach the wrapper; the result, the exception and restore are the original's."""
    from llmtrace.auto import code_swap, patching

    def make(offset):
        def inner(x, y=2, *, k=3):
            if x < 0:
                raise ValueError(x)
            return x + y + k + offset

        return inner

    held, seen = make(10), []
    bound = Model().step

    def around(original, args, kwargs):
        seen.append(args)
        return original(*args, **kwargs)

    code_swap.swap(held, around)
    code_swap.swap(Model.step, around)
    try:
        assert held(1) == 16 and held(1, 5, k=0) == 16
        with pytest.raises(ValueError):
            held(-1)
        assert bound(_Batch()) == 1  # bound before the swap
        assert [len(a) for a in seen] == [1, 2, 1, 2] and not code_swap.swappable(held)
        # the wrapper's samples are llmtrace's time, not the program's
        assert held.__code__.co_name == WRAPPER and not is_user_code(f"{HERE}:{held.__code__.co_qualname}:3")
    finally:
        patching.restore()
    assert held(1) == 16 and len(seen) == 4 and code_swap.swappable(held)
    decorated = make(0)
    llmtrace.trace("forward")(decorated)  # timed by the program: its C wrapper adds no frame
    assert not code_swap.swappable(decorated)
    assert code_swap.functions_named(HERE, "Model.step") == [Model.step]


# ---------------------------------------------------------------- a running loop


def _burn(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


class _Batch:
    shape = (4, 16)


class Model:
    def step(self, batch: _Batch) -> int:
        return 1


def _serve(stop: threading.Event, started: threading.Event) -> None:
    """The model is a closure held in a local, as a loop running before it was found holds it."""
    batch = _Batch()

    def model(b: _Batch) -> int:
        _burn(0.004)
        return b.shape[0]

    started.set()
    while not stop.is_set():
        model(batch)
        _burn(0.001)  # the step's overhead


@pytest.fixture
def watched():
    llmtrace.configure(enabled=True, propagate=False)
    drain_recorded_trace()
    llmtrace.instrument(["hot_loop"])
    sampler = stack_sampler.start(0.002)
    yield sampler
    llmtrace.uninstrument()
    stack_sampler.stop()
    drain_recorded_trace()


def test_a_running_loops_model_is_timed_and_gives_the_steps(watched):
    stop, started = threading.Event(), threading.Event()
    worker = threading.Thread(target=_serve, args=(stop, started))
    worker.start()
    started.wait()
    try:
        deadline = time.monotonic() + 10
        while not hot_loop._promoted and time.monotonic() < deadline:
            time.sleep(0.1)
        assert hot_loop._promoted == [f"{HERE}:_serve.<locals>.model"], "the model call was not found"
        time.sleep(0.3)  # steps timed from here on
    finally:
        stop.set()
        worker.join()
    trace = drain_recorded_trace()
    forwards = [s for s in trace.spans if s.name == names.FORWARD]
    assert len(forwards) >= 20
    assert forwards[0].attrs[names.A_FUNCTION] == f"{HERE}._serve.<locals>.model"
    assert forwards[0].attrs[names.A_BATCH] == 4 and forwards[0].attrs[names.A_INFERRED]
    a = Analysis(trace)
    assert a.breakdown.profile.source == "model-cadence" and len(a.steps) >= 15
    assert f"`{HERE}._serve.<locals>.model`" in a.breakdown.found.note
    assert a.tokens == 4 * len(a.steps)
