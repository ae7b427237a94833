"""The per-step / per-token breakdown and the serving metrics."""

import time

import pytest
from synthetic import (
    AGENT_PID,
    MASTER_PID,
    MS,
    EngineTraceBuilder,
    clean_trace,
    mp_queue_trace,
    pipelined_trace,
    record_pipeline,
)

import llmtrace
from llmtrace import names
from llmtrace.analyze.analysis import Analysis
from llmtrace.analyze.breakdown import GAP, MODEL
from llmtrace.load import load_trace


def _sums_to_wall(ctx):
    for sc in ctx.steps:
        assert sum(sc.parts.values()) == sc.wall_ns, (sc.step, sc.parts)
    view = ctx.breakdown.view()
    total = view["model_ms"] + sum(r["ms_per_token"] for r in view["stages"])
    assert total == pytest.approx(view["per_token_ms"], rel=1e-9)
    assert view["overhead_ms"] == pytest.approx(view["per_token_ms"] - view["model_ms"])
    return view


@pytest.mark.parametrize("kw", [{}, {"gpu": False}, {"device_timing": False}])
def test_stages_model_and_gap_add_up_to_step_time(kw):
    _sums_to_wall(Analysis(clean_trace(30, **kw)))


def test_gpu_model_is_device_time_and_agent_wait_is_replaced():
    b = EngineTraceBuilder()
    b.steps(10, batch=4, transport_ms=0.2, reply_ms=0.3, gap_ms=0.4)
    ctx = Analysis(b.build())
    view = _sums_to_wall(ctx)
    sc = ctx.steps[0]
    assert sc.parts[MODEL] == 20.5 * MS  # forward 20 + sampling 0.5 device ms
    assert sc.transport_ns == pytest.approx(0.5 * MS, abs=1)  # wait not covered by agent.step
    assert sc.parts[GAP] == 0.4 * MS
    assert sc.parts["preprocess"] == 0.5 * MS  # from the agent, not the master's agent.wait
    assert "agent" not in sc.parts
    assert view["model_ms"] == pytest.approx(20.5 / 4)
    assert view["tokens"] == 40


def test_cpu_model_is_host_time_less_host_side_nested_work():
    b = EngineTraceBuilder(gpu=False)
    b.steps(
        10,
        device={"forward": 10.0, "sampling": 1.0},
        nested={"sampling": [("sampling.host", 2.0, {}), ("logging.debug", 0.5, {})]},
    )
    ctx = Analysis(b.build())
    _sums_to_wall(ctx)
    sc = ctx.steps[0]
    assert sc.parts[MODEL] == 11.0 * MS
    assert sc.parts["sampling"] == 2.5 * MS  # host-side spans inside a model stage are overhead


def test_host_timed_gpu_forward_counts_as_model_and_sync_absorbs_device():
    ctx = Analysis(clean_trace(10, device_timing=False))
    sc = ctx.steps[0]
    assert sc.parts[MODEL] == pytest.approx(0.3 * MS)  # forward + sampling host time
    assert sc.parts["sync"] > 20 * MS


def test_decode_and_prefill_views_normalise_per_output_token():
    b = EngineTraceBuilder()
    b.steps(5, batch=1, prefill=True, device={"forward": 40.0})
    b.steps(20, batch=8)
    ctx = Analysis(b.build())
    bd = ctx.breakdown
    pre, dec = bd.view(bd.prefill_steps()), bd.view(bd.decode_steps())
    assert (pre["steps"], pre["tokens"], dec["steps"], dec["tokens"]) == (5, 5, 20, 160)
    assert pre["per_token_ms"] > 5 * dec["per_token_ms"]
    assert bd.view()["tokens"] == 165


def test_headline_names_model_and_largest_stages():
    b = EngineTraceBuilder()
    b.steps(10, batch=1, agent={"preprocess": 12.5})
    head = Analysis(b.build()).breakdown.view()["headline"]
    assert head.startswith("3") and "ms/token = 20.5 model + 12.5 preprocess" in head


def test_nested_spans_are_kept_as_top_functions_of_their_stage():
    b = EngineTraceBuilder()
    b.steps(10, batch=2, nested={"preprocess": [("logging.debug", 3.0, {})]})
    ctx = Analysis(b.build())
    (f,) = ctx.functions.stats(ctx.functions.select(stage="preprocess"))
    assert (f.name, f.count, f.total_ns) == ("logging.debug", 10, 30 * MS)
    assert ctx.steps[0].parts["preprocess"] == 3.5 * MS


def test_serving_metrics_from_requests_and_token_instants():
    b = EngineTraceBuilder()
    b.steps(4)
    t0 = 10_000 * MS
    b.request("a", t0, [t0 + 50 * MS, t0 + 60 * MS, t0 + 70 * MS], queue_ns=5 * MS)
    b.request("b", t0, [t0 + 100 * MS, t0 + 130 * MS], queue_ns=20 * MS)
    m = Analysis(b.build()).metrics
    assert m["requests"] == 2 and m["output_tokens"] == 5
    assert m["duration_s"] == pytest.approx(0.13)
    assert m["throughput_tok_s"] == pytest.approx(5 / 0.13)
    assert m["ttft_ms"]["p50"] == pytest.approx(50) and m["ttft_ms"]["p99"] == pytest.approx(100)
    assert sorted([m["tpot_ms"]["p50"], m["tpot_ms"]["p99"]]) == pytest.approx([10, 30])
    assert m["itl_ms"]["count"] == 3 and m["itl_ms"]["p99"] == pytest.approx(30)
    assert m["queue_ms"]["p99"] == pytest.approx(20)
    assert m["batch_size"]["max"] == 8


def test_generic_pipeline_without_engine_spans():
    b = EngineTraceBuilder(gpu=False)
    for i in range(5):  # a user pipeline: a top-level span per step, tokens from attrs
        root = b.span(1000, "generate", b.t, b.t + 3 * MS, step=i, attrs={"tokens": 2})
        b.span(1000, "tokenize", b.t, b.t + MS, root, i)
        b.span(1000, "forward", b.t + MS, b.t + 3 * MS, root, i)
        b.t += 4 * MS
    ctx = Analysis(b.build())
    view = _sums_to_wall(ctx)
    assert view["tokens"] == 10 and view["model_ms"] == pytest.approx(1.0)
    assert ctx.metrics["requests"] is None and ctx.metrics["output_tokens"] == 10


def test_injected_half_millisecond_in_a_real_trace_is_found(tmp_path):
    slept = record_pipeline(tmp_path)
    ctx = Analysis(load_trace(str(tmp_path)))
    view = _sums_to_wall(ctx)
    assert view["steps"] == 50 and view["tokens"] == 50
    post = next(r for r in view["stages"] if r["name"] == "postprocess")
    injected_ms_per_token = slept / 50 / 1e6
    assert injected_ms_per_token >= 0.5
    assert post["ms_per_token"] == pytest.approx(injected_ms_per_token, rel=0.10)
    assert view["stages"][0]["name"] == "postprocess"  # the largest overhead


def test_tensor_parallel_wait_is_replaced_by_the_slowest_rank():
    b = EngineTraceBuilder()
    b.steps(5, batch=4)
    trace = b.build()
    rank1 = 3000
    b.process(rank1, "agent-1")
    for wait in [s for s in trace.spans if s.name == "agent.wait"]:
        start, end = wait.start_ns + MS // 10, wait.end_ns - MS // 100  # finishes after rank 0
        root = b.span(rank1, "agent.step", start, end, step=wait.step)
        b.span(rank1, "preprocess", start, start + 2 * MS, root, wait.step)
        b.span(rank1, "forward", start + 2 * MS, end, root, wait.step)
    ctx = Analysis(b.build())
    _sums_to_wall(ctx)
    for sc in ctx.steps:
        assert sc.agent_root.pid == rank1
        assert sc.parts["preprocess"] == 2 * MS


def test_output_work_inside_agent_wait_is_hidden_until_it_outlasts_the_agent():
    b = EngineTraceBuilder()
    b.step(batch=4)
    b.steps(3, batch=4, output_in_wait=True)  # 0.3 ms of output work under a ~21 ms agent step
    b.step(batch=4, output_in_wait=True, master={"detokenize": 25.0}, transport_ms=0.2)
    trace = b.build()
    ctx = Analysis(trace)
    _sums_to_wall(ctx)
    for sc in ctx.steps[1:4]:
        assert "detokenize" not in sc.parts and "stream" not in sc.parts
        assert sc.transport_ns == pytest.approx(0.1 * MS, abs=1)  # transport 0.05 + reply 0.05
    sc = ctx.steps[4]
    detok = next(s for s in trace.spans if s.name == "detokenize" and s.parent_id == sc.wait.span_id)
    assert detok.step == sc.step - 1
    assert sc.parts["detokenize"] == detok.end_ns - sc.agent_root.end_ns  # the part past the agent's reply
    assert sc.parts["stream"] == 0.1 * MS
    assert sc.transport_ns == 0.2 * MS  # before the agent's step: transport, the work stays hidden
    assert sc.counts["detokenize"] == 1 and "detokenize" not in ctx.steps[1].counts


@llmtrace.trace
def _encode():
    sum(range(100))


_slept: list[int] = []


@llmtrace.trace
def _decode_slowly():
    t = time.perf_counter_ns()
    time.sleep(0.001)
    _slept.append(time.perf_counter_ns() - t)


@llmtrace.trace
def _generate_token():
    _encode()
    _decode_slowly()


def test_decorated_pipeline_without_step_ids(tmp_path):
    """`llmtrace record` on a plain program: the repeated top-level function is the step,
    `@llmtrace.trace` functions are rows by name."""
    llmtrace.configure(enabled=True, out=str(tmp_path), process_name="app", propagate=False)
    try:
        t = time.perf_counter_ns()
        for _ in range(30):
            _generate_token()
        elapsed = time.perf_counter_ns() - t
    finally:
        llmtrace.shutdown()
    ctx = Analysis(load_trace(str(tmp_path)))
    view = _sums_to_wall(ctx)
    assert view["steps"] == 30 and view["tokens"] == 30
    rows = {r["name"]: r for r in view["stages"]}
    assert {"_encode", "_decode_slowly"} <= rows.keys()
    assert view["stages"][0]["name"] == "_decode_slowly"
    assert rows["_decode_slowly"]["ms_per_token"] == pytest.approx(sum(_slept[-30:]) / 30 / 1e6, rel=0.1)
    assert view["per_token_ms"] <= elapsed / 30 / 1e6


def test_async_scheduling_counts_the_next_steps_device_time_in_the_window():
    """Pipelined steps: agent.step n launches step n+1 (its forward is a child of agent.step n)
    and the device runs the steps back to back; each master.step window's model time is the
    device work inside it, whichever step that work belongs to."""
    ctx = Analysis(pipelined_trace())
    _sums_to_wall(ctx)
    first, second, third = ctx.steps
    m = lambda x: int(x * MS)  # noqa: E731
    assert first.parts[MODEL] == m(12 - 1)  # step 0 from 1 ms, then step 1 from 11 ms
    assert second.parts[MODEL] == m(22 - 12)  # steps 1 and 2 back to back: the whole window
    assert third.parts[MODEL] == m(31 - 22)
    assert second.parts.get("sync", 0) == 0  # the wait overlaps device work only


def test_async_scheduling_master_work_under_the_next_agent_step_is_not_overhead():
    """CPU (host-timed forward): the agent starts step 1 as soon as it replies to step 0,
    while the master still postprocesses step 0. That postprocess is off the critical path:
    step 0's window counts step 1's forward as model time, not the postprocess."""
    b = EngineTraceBuilder()
    m = lambda x: int(x * MS)  # noqa: E731
    for n in range(2):
        t = 12 * n
        root = b.span(MASTER_PID, "master.step", m(t), m(t + 12), step=n, attrs={"batch": 4, "prefill": 0})
        b.span(MASTER_PID, "schedule", m(t), m(t + 0.1), root, n)
        b.span(MASTER_PID, "agent.wait", m(t + 0.2), m(t + 10.5), root, n)
        b.span(MASTER_PID, "postprocess", m(t + 10.6), m(t + 12), root, n)
    a0 = b.span(AGENT_PID, "agent.step", m(0.3), m(10.3), step=0)
    b.span(AGENT_PID, "forward", m(0.5), m(10.0), a0, 0)
    a1 = b.span(AGENT_PID, "agent.step", m(10.4), m(22.3), step=1)
    b.span(AGENT_PID, "forward", m(10.5), m(22.0), a1, 1)
    ctx = Analysis(b.build())
    _sums_to_wall(ctx)
    first = ctx.steps[0]
    assert first.parts.get("postprocess", 0) == 0
    assert first.parts[MODEL] == m(10.0 - 0.5) + m(12 - 10.5)  # its own forward, then step 1's
    # step 1's postprocess has no agent step under it: the agent is idle, it is overhead
    assert ctx.steps[1].parts["postprocess"] == m(1.4)


def test_a_wait_on_a_multiprocessing_queue_is_charged_to_the_thread_that_put_the_message():
    """A multiprocessing.Queue's feeder thread sends what put() queued: while the worker waited
    for its next input, the front's main thread slept before its put; the feeder only relayed."""
    parts = Analysis(mp_queue_trace()).breakdown.ms_per_token
    assert parts(names.SLEEP) == pytest.approx(1.5 / 4, rel=0.05)  # the front's sleep, not a wait
    assert parts(GAP) == pytest.approx(0.5 / 4, rel=0.05)  # its work before the sleep
    assert parts(names.IPC) == pytest.approx((0.1 + 2.4 + 0.5) / 4, rel=0.01)  # the put, its receive, the wait
