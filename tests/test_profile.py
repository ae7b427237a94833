"""Pipelines llmtrace did not write: how the analyzer finds their steps (profile.py) and
charges a blocking receive to the peer's work (peers.py)."""

from __future__ import annotations

import itertools

import pytest

import llmtrace
from llmtrace import names
from llmtrace.analyze.analysis import Analysis
from llmtrace.timeline import Process, Sample, Span, Trace

MS = 1_000_000
_ids = itertools.count(1)


def span(
    trace: Trace,
    name: str,
    start_ms: float,
    end_ms: float,
    pid: int = 1,
    tid: int = 1,
    parent: Span | None = None,
    step: int = -1,
    **attrs,
) -> Span:
    s = Span(
        name,
        name.split(".", 1)[0],
        pid,
        tid,
        int(start_ms * MS),
        int(end_ms * MS),
        next(_ids),
        parent.span_id if parent else 0,
        0,
        step,
        attrs,
    )
    trace.spans.append(s)
    return s


def trace_of(*pids: int) -> Trace:
    return Trace(processes={p: Process(p, f"p{p}", {"pid": p}) for p in pids})


def done(trace: Trace) -> Analysis:
    trace.sort()
    return Analysis(trace)


def test_model_cadence_makes_the_steps_and_leaves_out_idle_windows():
    t = trace_of(1)
    start = 0.0
    for k in range(20):
        if k == 10:
            start += 500  # idle: no request for half a second
        span(t, "forward", start, start + 2, batch=4)
        span(t, "sleep", start + 2, start + 3)  # a polling sleep after each forward
        start += 4
    ctx = done(t)
    found = ctx.breakdown.found
    assert found.profile.source == "model-cadence" and found.idle_windows == 1
    assert len(ctx.steps) == 19 and ctx.breakdown.tokens == 19 * 4  # one token per sequence of the forward
    view = ctx.breakdown.view()
    sleep = next(r for r in view["stages"] if r["name"] == names.SLEEP)
    assert sleep["ms_per_step"] == pytest.approx(1.0) and view["model_ms"] == pytest.approx(2.0 / 4)
    assert "model's cadence" in found.note and "idle" in found.note


def test_a_handler_that_holds_a_whole_decode_loop_is_not_the_step():
    t = trace_of(1)
    for r in range(3):  # three requests, each handler span holding 10 forwards
        h = span(t, names.HTTP_REQUEST, r * 100, r * 100 + 60)
        for k in range(10):
            span(t, "forward", r * 100 + k * 5, r * 100 + k * 5 + 3, parent=h)
    ctx = done(t)
    assert ctx.breakdown.profile.source == "model-cadence"
    assert ctx.breakdown.found.idle_windows == 2  # the waits between the requests
    assert len(ctx.steps) == 28 and all(sc.root.name == names.STEP for sc in ctx.steps)


def test_a_handler_ending_inside_its_last_steps_window_keeps_no_model_time():
    """Requests back to back on one thread (a lock): the window of a request's last forward
    runs to the next request's first, so the handler ends inside it; its forward is model
    time, not the handler's stage."""
    t = trace_of(1)
    for r in range(4):
        h = span(t, names.HTTP_REQUEST, r * 50, r * 50 + 48)
        for k in range(8):
            span(t, "forward", r * 50 + 2 + k * 5, r * 50 + 6 + k * 5, parent=h)
    view = done(t).breakdown.view()
    assert view is not None and view["model_ms"] == pytest.approx(4.0)  # every step's forward, the last one too
    http = next(r for r in view["stages"] if r["name"] == names.HTTP)
    assert http["p99_ms"] == pytest.approx(2.0)  # the next handler's own 2 ms before its first forward, no forward


def test_another_asyncio_tasks_spans_are_not_the_steps_stages():
    """One event-loop thread: the batching task runs forward (2 ms), sleeps 1 ms; a
    handler's request span and a server's 25 ms periodic sleep (other tasks) are open
    across the forwards. They are no stage of the steps, and samples crowded into them
    (where the loop let go of the GIL) stand for no more than the steps' time."""
    t = trace_of(1)
    for k in range(40):
        span(t, "forward", k * 4, k * 4 + 2, batch=4)
        span(t, "sleep.batch", k * 4 + 2, k * 4 + 3)
        t.samples.append(Sample(1, 1, int((k * 4 + 2.5) * MS), ("app:loop", f"app:idle_{k % 2}")))
    for r in range(8):
        span(t, names.HTTP_REQUEST, r * 20 + 1.5, r * 20 + 30)
        span(t, "sleep.server", r * 20 + 3.5, r * 20 + 28.5)
    ctx = done(t)
    stages = {st for sc in ctx.steps for st, _ in sc.stage_spans}
    assert stages == {names.FORWARD, names.SLEEP}, stages
    view = ctx.breakdown.view()
    sleep = next(r for r in view["stages"] if r["name"] == names.SLEEP)
    assert sleep["ms_per_step"] == pytest.approx(1.0)
    sampled = ctx.functions.stats(ctx.functions.select(stage=names.SLEEP))
    assert {f.name for f in sampled} == {"app.idle_0", "app.idle_1"}
    assert sum(f.total_ns for f in sampled) <= sum(sc.parts[names.SLEEP] for sc in ctx.steps)


def test_forwards_handed_to_a_thread_pool_are_one_step_loop():
    """A loop hands each step to one of 3 pool threads in turn (run_in_executor): the
    windows follow the forwards across the threads, none overlapping; per thread they
    would cover each thread's idle turns and count the same time three times."""
    t = trace_of(1)
    for k in range(30):
        span(t, "forward", k * 4.0, k * 4.0 + 3, tid=10 + k % 3, batch=2)
    ctx = done(t)
    roots = [sc.root for sc in ctx.steps]
    assert len(roots) == 30 and [r.tid for r in roots[:4]] == [10, 11, 12, 10]
    assert all(a.end_ns <= b.start_ns for a, b in zip(roots, roots[1:]))
    assert ctx.breakdown.per_token_ms == pytest.approx(4.0 / 2, rel=0.02)


def test_the_next_pool_threads_work_before_its_forward_is_the_steps_gap():
    """Each pool thread pads the batch (unannotated, 1 ms) before its forward: that work
    lies in the previous forward's window on another thread, and its samples name it."""
    t = trace_of(1)
    for k in range(30):
        tid = 10 + k % 3
        span(t, "forward", k * 4.0 + 1, k * 4.0 + 3, tid=tid, batch=2)
        t.samples.append(Sample(1, tid, int((k * 4.0 + 0.5) * MS), ("app:run_step", f"app:pad_rows_{k % 2}")))
    ctx = done(t)
    sampled = {f.name for f in ctx.functions.stats(ctx.functions.select(stage="gap"))}
    assert {"app.pad_rows_0", "app.pad_rows_1"} <= sampled


def test_a_repeated_span_holding_one_forward_is_the_step():
    t = trace_of(1)
    for k in range(5):
        root = span(t, "loop.iteration", k * 10, k * 10 + 8, tokens=2)
        span(t, "preprocess", k * 10, k * 10 + 2, parent=root)
        span(t, "forward", k * 10 + 2, k * 10 + 8, parent=root)
    ctx = done(t)
    assert ctx.breakdown.profile.source == "repeated-span" and len(ctx.steps) == 5
    assert ctx.breakdown.tokens == 10


def test_a_repeated_span_is_one_processs_loop():
    """No model span anywhere: a front's queue reads and its worker's are two loops, and the
    steps are the busier one's, not both interleaved."""
    t = trace_of(1, 2)
    for k in range(6):
        for pid, n in ((1, 1), (2, 2)):  # the worker reads twice per step of the front
            for j in range(n):
                get = span(t, "ipc.get", k * 10 + j * 4, k * 10 + j * 4 + 3, pid=pid, stage="ipc")
                span(t, "ipc.recv", k * 10 + j * 4, k * 10 + j * 4 + 3, pid=pid, parent=get, stage="ipc")
    ctx = done(t)
    assert ctx.breakdown.profile.source == "repeated-span" and len(ctx.steps) == 12
    assert {sc.root.pid for sc in ctx.steps} == {2}


def test_llmtrace_steps_marks_the_loop_even_under_another_span():
    from llmtrace import recorder
    from llmtrace.spool_format import Batch
    from llmtrace.timeline import RecordDecoder

    recorder.drain()
    recorder.requeue_strings()
    recorder.set_enabled(True)
    try:
        with llmtrace.span("worker.request"):  # the README's follows= wrapper: steps nested under it
            for _ in llmtrace.steps([[1, 2], [3, 4, 5]]):
                with llmtrace.span("forward"):  # the loop body runs inside the step's span
                    pass
    finally:
        recorder.set_enabled(False)
    data, n, strings, _ = recorder.drain()
    t = Trace()
    RecordDecoder(Process(1, "p", {})).add(Batch(strings, {}, memoryview(data), n), t)
    ctx = done(t)
    assert ctx.breakdown.profile.source == "step-spans" and len(ctx.steps) == 2
    assert all(sc.root.name == names.STEP for sc in ctx.steps)


def test_a_blocking_receive_is_charged_to_the_senders_work():
    """The worker (pid 2) runs the model and waits on its socket; the master (pid 1)
    formats a log line for 4 ms before it sends the next step's frame."""
    t = trace_of(1, 2)
    for k in range(6):
        base = k * 20
        span(t, "forward", base, base + 5, pid=2, batch=1)
        span(t, "tcp.send", base + 5, base + 5.1, pid=2, bytes=64)
        span(t, "tcp.recv", base + 5.1, base + 20, pid=2, bytes=128)  # waits for the master
        span(t, "tcp.recv", base + 5.2, base + 5.3, pid=1, bytes=64)
        span(t, "logging", base + 6, base + 10, pid=1)
        span(t, "tcp.send", base + 19.8, base + 19.9, pid=1, bytes=128)
        span(t, "tcp.send", base + 10, base + 10.1, pid=3, bytes=999)  # some other process: not the sender
    ctx = done(t)
    view = ctx.breakdown.view()
    rows = {r["name"]: r for r in view["stages"]}
    assert rows[names.LOGGING]["ms_per_step"] == pytest.approx(4.0, abs=0.01)
    assert rows["gap"]["ms_per_step"] == pytest.approx(10.6, abs=0.01)  # the master's unannotated work
    assert rows[names.TCP]["ms_per_step"] < 1.0  # the transport itself


def test_a_receive_no_peer_answered_is_a_wait_in_the_step():
    from llmtrace.analyze.rules import run_rules

    t = trace_of(1, 2)
    for k in range(8):
        base = k * 10
        span(t, "forward", base, base + 5, pid=2, batch=4)
        span(t, "ipc.get", base + 5, base + 9, pid=2)  # a get(timeout=...) that timed out
    span(t, "ipc.put", 18, 18.1, pid=1)  # a request put at 18 ms ended the wait of step 1 only
    ctx = done(t)
    (s,) = [s for s in run_rules(ctx) if s.id == "wait-in-step"]
    assert s.evidence["steps_affected"] == 7 and s.est_saving_ms_per_token == pytest.approx(7 * 4 / 32, rel=0.01)


def test_a_log_call_line_names_the_formatting_of_its_arguments(tmp_path):
    from llmtrace.analyze.functions import line_callee

    main = tmp_path / "server.py"
    main.write_text(
        "import logging\nlog = logging.getLogger()\n"
        "def step(x):\n    log.debug(f'logits {x.tolist()}')\n    return np.concatenate([x])\n"
    )
    assert line_callee("__main__:step:4", str(main)) == "logging.Logger.debug"
    assert line_callee("__main__:step:5", str(main)) == "numpy.concatenate"
    assert line_callee("__main__:step:4") is None  # without the process's main file: not this process's


def test_caller_skips_library_frames():
    import json

    from llmtrace.auto.caller import caller

    def instrumented(obj):  # stands for a wrapper: its caller is two frames up
        return caller()

    def program_function():
        return json.loads("[1]", object_hook=None) and instrumented(1)

    assert program_function() == f"{__name__}.test_caller_skips_library_frames.<locals>.program_function"


def _submodule_step(t: Trace, start: float, fns: list[str], batch: int = 2) -> float:
    """One step whose model call is several outermost module calls (0.5 ms each, 0.1 ms
    apart), then 1 ms of host work; returns where the next step starts."""
    for i, fn in enumerate(fns):
        span(t, "forward", start + 0.6 * i, start + 0.6 * i + 0.5, fn=fn, batch=batch, tokens=batch)
    return start + 0.6 * len(fns) + 1.0


def test_a_model_called_through_its_forward_is_one_model_call_per_step():
    """`model.forward(ids)` called directly: the outermost module calls are its embedding,
    blocks and head, one step's worth of them each time (each of them was a step: 6x the
    steps, a sixth of the time per token)."""
    t, start = trace_of(1), 0.0
    for _ in range(30):
        start = _submodule_step(t, start, ["Embedding", "Block", "Block", "Block", "Block", "Linear"])
    ctx = done(t)
    assert len(ctx.steps) == 30 and ctx.breakdown.tokens == 30 * 2
    view = ctx.breakdown.view()
    assert view is not None and view["model_ms"] == pytest.approx((0.6 * 5 + 0.5) / 2)  # per token, layers' gaps in
    fwd = [s for s in ctx.index.by_stage[names.FORWARD] if ctx.index.is_root(s)]
    assert len(fwd) == 30 and fwd[0].attrs[names.A_FUNCTION] == "Embedding+Block+Linear"


def test_a_model_and_a_sampler_module_per_step_make_one_step():
    t, start = trace_of(1), 0.0
    for _ in range(20):
        start = _submodule_step(t, start, ["LlamaForCausalLM", "Sampler"])
    assert len(done(t).steps) == 20


def test_one_module_per_step_is_left_as_it_is():
    t, start = trace_of(1), 0.0
    for k in range(20):
        start = _submodule_step(t, start, ["LlamaForCausalLM" if k else "Warmup"])
    ctx = done(t)
    assert len(ctx.steps) == 20
    assert all(not ctx.index.children.get(s.span_id) for s in ctx.index.by_stage[names.FORWARD])
