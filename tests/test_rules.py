"""Each rule fires on a trace built with its antipattern, with the right stage, evidence and
a saving within 10% of the injected cost, and stays silent on clean traces."""

import pytest
from synthetic import AGENT_PID, MASTER_PID, MS, EngineTraceBuilder, clean_trace, mp_queue_trace

from llmtrace.analyze.analysis import Analysis
from llmtrace.analyze.rules import RULES, run_rules
from llmtrace.timeline import Sample

SAMPLING_AFTER_SYNC = [
    "tcp.recv",
    "shm.read",
    "preprocess",
    "forward",
    "sync.wait",
    "sampling",
    "shm.write",
    "tcp.send",
]


def _only(ctx, rule_id):
    found = [s for s in run_rules(ctx) if s.id == rule_id]
    assert found, f"{rule_id} did not fire; got {[s.id for s in run_rules(ctx)]}"
    return found


def _one(ctx, rule_id):
    (s,) = _only(ctx, rule_id)
    return s


@pytest.mark.parametrize("kw", [{}, {"gpu": False}])
def test_clean_traces_get_no_suggestions(kw):
    assert run_rules(Analysis(clean_trace(60, **kw))) == []


def test_rule_ids_are_stable_kebab_case_and_unique():
    ids = [r.ID for r in RULES]
    assert len(set(ids)) == len(ids) >= 10
    assert all(i == i.lower() and " " not in i and "_" not in i for i in ids)


def test_log_in_hot_path_from_nested_spans():
    b = EngineTraceBuilder()
    b.steps(30, batch=1, nested={"preprocess": [("logging.debug", 7.0, {})]})
    ctx = Analysis(b.build())
    s = _one(ctx, "log-in-hot-path")
    assert s.stage == "preprocess"
    assert s.est_saving_ms_per_token == pytest.approx(7.0, rel=0.1)
    lo, hi = s.interval  # the same 7 ms in every step: a tight interval around the estimate
    assert lo <= s.est_saving_ms_per_token <= hi and hi - lo < 0.1
    assert s.evidence["functions"][0]["name"] == "logging.debug"
    assert s.evidence["steps_affected"] == 30 and s.evidence["example_steps"] == [0, 1, 2, 3, 4]
    per_token = ctx.per_token_ms
    assert s.est_speedup == pytest.approx(per_token / (per_token - s.est_saving_ms_per_token), rel=1e-3)


def _stage_spans(trace, name):
    return [s for s in trace.spans if s.name == name and s.pid == AGENT_PID]


def test_log_in_hot_path_from_viztracer_functions_counts_nested_calls_once():
    b = EngineTraceBuilder()
    b.steps(20, batch=1, agent={"preprocess": 3.0})
    trace = b.build()
    for s in _stage_spans(trace, "preprocess"):
        us = s.start_ns / 1000
        trace.foreign_events += [
            {
                "ph": "X",
                "name": "logging.Logger.debug",
                "ts": us + 100,
                "dur": 2000,
                "pid": s.pid,
                "tid": s.tid,
                "cat": "viztracer",
            },
            {
                "ph": "X",
                "name": "numpy.core.arrayprint._array_repr",
                "ts": us + 200,
                "dur": 1500,
                "pid": s.pid,
                "tid": s.tid,
                "cat": "viztracer",
            },
        ]
    s = _one(Analysis(trace), "log-in-hot-path")
    assert s.est_saving_ms_per_token == pytest.approx(2.0, rel=0.1)
    assert {f["name"] for f in s.evidence["functions"]} == {"logging.Logger.debug", "numpy.core.arrayprint._array_repr"}
    assert s.evidence["functions"][0]["sources"] == ["viztracer"]


def test_log_in_hot_path_from_stack_samples():
    b = EngineTraceBuilder()
    b.steps(20, batch=1, agent={"preprocess": 3.0})
    trace = b.build()
    loop = ("engine.agent:main", "engine.agent:Agent.run_step")
    for s in _stage_spans(trace, "preprocess"):
        for k in range(30):  # every 0.1 ms; the first 2 ms inside logger.debug formatting an array
            stack = loop + (
                ("engine.agent:Agent.preprocess", "logging:Logger.debug", "numpy.core.arrayprint:_array_repr:1580")
                if k < 20
                else ("engine.agent:Agent.preprocess:212",)
            )
            trace.samples.append(Sample(s.pid, s.tid, s.start_ns + 50_000 + k * 100_000, stack))
    s = _one(Analysis(trace), "log-in-hot-path")
    assert s.est_saving_ms_per_token == pytest.approx(2.0, rel=0.1)
    assert "logging.Logger.debug" in {f["name"] for f in s.evidence["functions"]}


def test_concat_padding():
    b = EngineTraceBuilder()
    b.steps(30, batch=1, nested={"preprocess": [("np.concatenate", 0.6, {})] * 8})
    s = _one(Analysis(b.build()), "concat-padding")
    assert s.stage == "preprocess"
    assert s.est_saving_ms_per_token == pytest.approx(4.8, rel=0.1)
    assert s.evidence["functions"][0]["count"] == 240


def test_full_logits_transfer_subtracts_device_sampling_estimate():
    b = EngineTraceBuilder()
    b.steps(
        30,
        batch=8,
        agent_order=SAMPLING_AFTER_SYNC,
        device={"sampling": 0},
        nested={"sampling": [("sampling.host", 2.5, {"logits_bytes": 8 * 128256 * 4})]},
    )
    s = _one(Analysis(b.build()), "full-logits-transfer")
    assert s.stage == "sampling"
    assert s.est_saving_ms_per_token == pytest.approx(2.5 / 8, rel=0.1)
    assert s.est_saving_ms_per_token < 2.5 / 8  # less the device estimate
    assert s.evidence["logits_bytes"] == 8 * 128256 * 4 and s.evidence["device_sampling_ms_est"] > 0


def test_full_logits_transfer_from_the_sampling_span_d2h_bytes():
    b = EngineTraceBuilder(gpu=False)  # the engine's host_sampling: the sampling span itself copies logits
    logits = 16 * 32000 * 4
    b.steps(30, batch=16, device={"sampling": 3.0}, span_attrs={"sampling": {"d2h_bytes": logits}})
    b.steps(30, batch=16, span_attrs={"sampling": {"d2h_bytes": 8 * 16}})  # ids only: fine
    ctx = Analysis(b.build())
    s = _one(ctx, "full-logits-transfer")
    assert ctx.steps[0].parts["sampling"] == 3.0 * MS and "sampling" not in ctx.steps[-1].parts
    assert s.evidence["steps_affected"] == 30 and s.evidence["logits_bytes"] == logits
    assert s.est_saving_ms_per_token == pytest.approx(30 * 3.0 / ctx.tokens, rel=0.1)


def _async_steps_with_one_token_windows(sampling_attrs: dict):
    """Async scheduling, batch 128: agent.step n+1 (and its sampling launch, 8 bytes of ids
    per sequence) starts inside master.step n's window; odd steps output one token."""
    b = EngineTraceBuilder()
    m = lambda x: int(x * MS)  # noqa: E731
    for n in range(12):
        t = 12 * n
        root = b.span(
            MASTER_PID,
            "master.step",
            m(t),
            m(t + 12),
            step=n,
            attrs={"batch": 128, "prefill": 0, "output_tokens": 1 if n % 2 else 128},
        )
        b.span(MASTER_PID, "schedule", m(t), m(t + 0.1), root, n)
        b.span(MASTER_PID, "agent.wait", m(t + 0.2), m(t + 10.5), root, n)
        b.span(MASTER_PID, "postprocess", m(t + 10.6), m(t + 12), root, n)
        a = m(0.3) if n == 0 else m(t - 1.6)
        agent = b.span(AGENT_PID, "agent.step", a, m(t + 10.3), step=n)
        b.span(AGENT_PID, "forward", a + m(0.1), a + m(0.2), agent, n, device=(m(t + 0.5), m(t + 12.45)))
        b.span(
            AGENT_PID,
            "sampling",
            a + m(0.2),
            a + m(0.5),
            agent,
            n,
            attrs=sampling_attrs,
            device=(m(t + 12.45), m(t + 12.5)),
        )
        b.span(AGENT_PID, "sync.wait", m(t + 1), m(t + 10.2), agent, n)
    return Analysis(b.build())


def test_full_logits_transfer_judges_a_span_by_its_own_sequences():
    """A window holds the next step's sampling span: 1024 bytes of ids for 128 sequences
    is not logits, even where the window's own step output a single token."""
    ids_only = {"d2h_bytes": 8 * 128}
    assert "full-logits-transfer" in [s.id for s in run_rules(_async_steps_with_one_token_windows(ids_only))]
    ctx = _async_steps_with_one_token_windows({**ids_only, "seqs": 128})
    assert "full-logits-transfer" not in [s.id for s in run_rules(ctx)]
    assert all(sc.parts.get("sampling", 0) == 0 for sc in ctx.steps)  # launches hidden by the device


def test_unsynced_gpu_timing_short_launch_long_sync():
    s = _one(Analysis(clean_trace(30, device_timing=False)), "unsynced-gpu-timing")
    assert s.stage == "sync" and s.est_saving_ms_per_token == 0
    assert s.evidence["misattributed_ms_per_token"] == pytest.approx(20.5 / 8, rel=0.1)
    assert (
        s.impact == f"a true breakdown: {s.evidence['misattributed_ms_per_token']:.3f} ms/token of device "
        "work now shows as sync"
    )


def test_unsynced_gpu_timing_wait_lands_in_host_timed_sampling():
    b = EngineTraceBuilder(device_timing=False)  # the engine's host_timed_forward: no sync.wait span
    no_sync = [n for n in SAMPLING_AFTER_SYNC if n != "sync.wait"]
    b.steps(30, agent_order=no_sync, agent={"sampling": 20.5})
    s = _one(Analysis(b.build()), "unsynced-gpu-timing")
    assert s.stage == "sampling"
    assert s.evidence["misattributed_ms_per_token"] == pytest.approx(20.5 / 8, rel=0.1)


def test_unsynced_gpu_timing_periodic_spikes():
    b = EngineTraceBuilder(device_timing=False)
    for i in range(40):  # a .item() every 4th step in postprocess absorbs the queued device work
        spike = i % 4 == 3
        b.step(
            batch=1,
            device={"forward": 0.3},
            master={"postprocess": 0.3},
            nested={"postprocess": [("Tensor.item", 11.7, {})]} if spike else None,
        )
    ctx = Analysis(b.build())
    (s,) = [x for x in _only(ctx, "unsynced-gpu-timing") if x.stage == "postprocess"]
    assert not [x for x in run_rules(ctx) if x.id == "hot-function-in-stage" and x.stage == "postprocess"]
    assert s.evidence["period_steps"] == 4 and s.evidence["spikes"] == 10
    assert s.evidence["misattributed_ms_per_token"] == pytest.approx(10 * 11.7 / 40, rel=0.1)


def test_periodic_spikes_without_a_sync_are_not_blamed_on_timing():
    b = EngineTraceBuilder(device_timing=False)
    for i in range(40):  # periodic, but nothing in the spikes syncs: not a timing artefact
        b.step(batch=1, device={"forward": 0.3}, master={"postprocess": 12.0 if i % 4 == 3 else 0.3})
    assert not [s for s in run_rules(Analysis(b.build())) if s.id == "unsynced-gpu-timing" and s.stage == "postprocess"]


def test_tcp_nodelay_40ms_stalls_while_agent_idle():
    b = EngineTraceBuilder()
    for i in range(40):
        b.step(batch=8, transport_ms=40.0 if i % 5 == 0 else 0.05)
    s = _one(Analysis(b.build()), "tcp-nodelay")
    assert s.stage == "tcp"
    assert s.est_saving_ms_per_token == pytest.approx(8 * 40.0 / 320, rel=0.1)
    assert s.evidence["measures"]["agent.wait residual"]["stalls"] == 8


@pytest.mark.parametrize("nodelay", [None, 0, 1])
def test_stalls_are_nagle_unless_every_send_had_nodelay_on(nodelay):
    b = EngineTraceBuilder()  # 40 ms receives: Nagle's signature, or a loaded machine's delays
    for i in range(40):
        b.step(batch=8, transport_ms=40.0 if i % 5 == 0 else 0.05)
    trace = b.build()
    for s in trace.spans:
        if s.name == "tcp.send" and nodelay is not None:
            s.attrs["nodelay"] = nodelay
    found = [s.id for s in run_rules(Analysis(trace)) if s.id == "tcp-nodelay"]
    assert found == ([] if nodelay == 1 else ["tcp-nodelay"])


def test_tcp_nodelay_when_every_reply_stalls():
    b = EngineTraceBuilder()
    b.steps(20, batch=4, reply_ms=38.0)
    s = _one(Analysis(b.build()), "tcp-nodelay")
    measure = s.evidence["measures"]["agent.wait residual"]
    assert measure["stalls"] == 20 and measure["baseline_ms"] == 0.1
    assert s.est_saving_ms_per_token == pytest.approx(38.0 / 4, rel=0.1)


@pytest.mark.parametrize("nodelay", [0, 1])
def test_tcp_nodelay_off_without_a_stall_is_a_latent_finding(nodelay):
    b = EngineTraceBuilder()
    b.steps(20, batch=4)
    trace = b.build()
    for s in trace.spans:
        if s.name == "tcp.send":
            s.attrs["nodelay"] = nodelay
    found = [s for s in run_rules(Analysis(trace)) if s.id == "tcp-nodelay"]
    if nodelay:
        assert not found
        return
    (s,) = found
    assert s.est_saving_ms_per_token == 0 and s.impact.startswith("latent")
    assert s.evidence["steps_affected"] == 20 and set(s.evidence["processes"]) == {"master", "agent-0"}


def _cpu_overhead_ms():
    """Non-model host time of a default CPU step (all stages but forward/sampling, plus transport)."""
    b = EngineTraceBuilder(gpu=False)
    b.step()
    sc = Analysis(b.build()).steps[0]
    return (sc.wall_ns - sc.parts["model"]) / MS


def test_small_prefill_batch():
    b = EngineTraceBuilder(gpu=False)
    b.steps(10, batch=1, prefill=True, waiting=5)
    b.steps(20, batch=8)
    ctx = Analysis(b.build())
    s = _one(ctx, "small-prefill-batch")
    avoided = 10 - 2  # 10 single prefills, 6 at a time -> 2 steps
    assert s.evidence["steps_avoidable"] == avoided
    assert s.est_saving_ms_per_token == pytest.approx(avoided * _cpu_overhead_ms() / ctx.tokens, rel=0.1)


def test_kv_cache_pressure_preemptions_and_capped_batch():
    b = EngineTraceBuilder(max_num_seqs=16, kv_blocks_total=100)
    b.steps(4, batch=2, prefill=True, kv_used=50)
    for _ in range(3):
        b.instant("preempt", req="r1")
    b.steps(30, batch=4, waiting=4, kv_used=98)
    ctx = Analysis(b.build())
    found = {s.title.split(" ")[1]: s for s in _only(ctx, "kv-cache-pressure")}
    pre = next(s for s in found.values() if "preemptions" in s.evidence)
    prefill_wall = ctx.steps[0].wall_ns
    assert pre.est_saving_ms_per_token == pytest.approx(3 * prefill_wall / MS / ctx.tokens, rel=0.1)
    capped = next(s for s in found.values() if "steps_capped" in s.evidence)
    decode_wall = sum(sc.wall_ns for sc in ctx.steps[4:]) / MS
    assert capped.evidence["batch_possible_p50"] == 8
    assert capped.est_saving_ms_per_token == pytest.approx(decode_wall / 2 / ctx.tokens, rel=0.1)


def test_kv_cache_oversized_budget_saves_memory_not_time():
    b = EngineTraceBuilder(kv_blocks_total=1000)
    b.steps(20, kv_used=100)
    s = _one(Analysis(b.build()), "kv-cache-pressure")
    assert s.est_saving_ms_per_token == 0 and s.evidence["kv_usage_peak"] == pytest.approx(0.1)
    assert s.impact == "memory: 900 of 1000 KV blocks were never used"


def test_kv_usage_without_its_total_is_no_budget_finding():
    b = EngineTraceBuilder()  # a program that counts the blocks it uses but not its budget
    b.steps(20, kv_used=100)
    ctx = Analysis(b.build())
    assert [s.id for s in run_rules(ctx) if s.id == "kv-cache-pressure"] == [] and ctx.rule_errors == []


def test_gc_pauses_from_gc_spans():
    b = EngineTraceBuilder()
    for i in range(40):
        b.step(batch=4, nested={"postprocess": [("gc", 6.0, {"generation": 2})]} if i % 10 == 0 else None)
    s = _one(Analysis(b.build()), "gc-pauses")
    assert s.stage == "gc" and s.evidence["collections_in_steps"] == 4
    assert s.est_saving_ms_per_token == pytest.approx(4 * 6.0 / 160, rel=0.1)


def test_gc_pauses_name_the_code_the_collections_interrupted():
    b = EngineTraceBuilder()
    for i in range(40):
        b.step(batch=4, nested={"postprocess": [("gc", 6.0, {"generation": 2})]} if i % 10 == 0 else None)
    t = b.build()
    for g in (s for s in t.spans if s.name == "gc"):
        t.samples.append(
            Sample(
                g.pid,
                g.tid,
                (g.start_ns + g.end_ns) // 2,
                ("app.postprocess:render_tokens:42", "llmtrace.gc_spans:_callback:17"),
            )
        )
    t.sort()
    s = _one(Analysis(t), "gc-pauses")
    assert s.evidence["responsible"][0]["function"] == "app.postprocess.render_tokens:42"
    assert "collections start in app.postprocess.render_tokens:42" in s.title


def test_gc_pauses_unexplained_gaps():
    b = EngineTraceBuilder()
    for i in range(40):
        b.step(batch=4, gap_ms=8.0 if i % 10 == 0 else 0.0)
    s = _one(Analysis(b.build()), "gc-pauses")
    assert s.stage == "gap" and s.evidence["pauses"] == 4
    assert s.est_saving_ms_per_token == pytest.approx(4 * 8.0 / 160, rel=0.1)


def test_underfilled_batch_max_from_trace():
    b = EngineTraceBuilder(max_num_seqs=32, kv_blocks_total=100)
    b.steps(30, batch=4, waiting=10, kv_used=50)
    ctx = Analysis(b.build())
    s = _one(ctx, "underfilled-batch")
    assert s.evidence["max_num_seqs"] == 32 and s.evidence["batch_possible_p50"] == 14
    assert s.est_saving_ms_per_token == pytest.approx(ctx.per_token_ms * (1 - 4 / 14), rel=0.1)


def _pressure_fixes(settings: dict | None) -> str:
    from llmtrace import names

    b = EngineTraceBuilder(max_num_seqs=16, kv_blocks_total=100)
    if settings is not None:
        b.trace.processes[MASTER_PID].header["resource"][names.R_SETTINGS] = settings
    b.steps(4, batch=2, prefill=True, kv_used=50)
    b.instant("preempt", req="r1")
    b.steps(30, batch=4, waiting=4, kv_used=98)
    return " ".join(s.fix for s in _only(Analysis(b.build()), "kv-cache-pressure"))


def test_fixes_name_the_settings_the_pipeline_declares_and_no_others():
    """The engine declares its config keys (engine/trace_resource.py SETTINGS) and every one
    exists in its config schema; a pipeline that declares none gets a description, not
    setting names of some other program."""
    from engine.config import load_config
    from engine.trace_resource import SETTINGS
    from llmtrace import names

    assert set(SETTINGS) == set(names.KNOBS)
    defaults = load_config(None)
    for key in SETTINGS.values():
        section, field = key.split(".")
        value = getattr(getattr(defaults, section), field)
        load_config(None, [f"{key}={value if value is not None else 100_000}"])  # an unknown key raises ConfigError
    engine = _pressure_fixes(SETTINGS)
    assert "`engine.num_blocks`" in engine and "`engine.max_num_seqs`" in engine
    foreign = _pressure_fixes(None)
    assert "engine." not in foreign and "`" not in foreign
    for name in ("num_kv_blocks", "gpu_memory_utilization", "max_num_batched_tokens", "max_num_seqs", "num_blocks"):
        assert name not in foreign, name


def test_underfilled_batch_needs_the_max_in_the_trace():
    b = EngineTraceBuilder(kv_blocks_total=100)
    b.steps(30, batch=4, waiting=10, kv_used=50)
    assert not [s for s in run_rules(Analysis(b.build())) if s.id == "underfilled-batch"]


def test_hot_function_in_stage_skips_what_specific_rules_explained():
    b = EngineTraceBuilder()
    b.steps(
        30,
        batch=2,
        nested={
            "detokenize": [("Detokenizer.decode_incremental", 3.0, {})],
            "preprocess": [("logging.debug", 2.0, {})],
        },
    )
    ctx = Analysis(b.build())
    (s,) = _only(ctx, "hot-function-in-stage")
    assert s.stage == "detokenize" and s.evidence["function"] == "Detokenizer.decode_incremental"
    assert s.est_saving_ms_per_token == pytest.approx(3.0 / 2, rel=0.1)


def test_a_large_stage_with_nothing_recorded_inside_asks_for_function_data():
    b = EngineTraceBuilder()
    b.steps(20, batch=1, agent={"preprocess": 12.5})
    (s,) = _only(Analysis(b.build()), "hot-function-in-stage")
    assert s.stage == "preprocess" and s.est_saving_ms_per_token == 0
    assert "detail: full" in s.fix


def test_suggestions_are_ranked_by_saving():
    b = EngineTraceBuilder()
    b.steps(30, batch=1, nested={"preprocess": [("logging.debug", 7.0, {}), ("np.concatenate", 4.8, {})]})
    found = run_rules(Analysis(b.build()))
    assert [s.id for s in found] == ["log-in-hot-path", "concat-padding"]


def test_hot_function_found_by_stack_samples_in_a_real_trace(tmp_path):
    from synthetic import record_pipeline

    from llmtrace.load import load_trace

    slept = record_pipeline(tmp_path, steps=60, inject_s=0.0, helper_s=0.004, sample_hz=1000)
    ctx = Analysis(load_trace(str(tmp_path)))
    assert ctx.trace.samples and len(ctx.steps) == 60
    (s,) = _only(ctx, "hot-function-in-stage")
    assert s.stage == "postprocess" and s.evidence["function"].split(":")[0].endswith("_render_tokens")
    assert s.evidence["sources"] == ["samples:llmtrace"]
    # a sampled estimate: one sampling interval per sample (the bias this guards against, a
    # sample counted for its span's length, was 5-10x high). How close it comes is the
    # benchmarks' measure (estimate_truth.py, diagnosis_accuracy.py): run after the rest of
    # the suite, 60 steps' samples came out half the truth in about 1 run of 5
    assert 0.4 < s.est_saving_ms_per_token / (slept / 60 / 1e6) < 1.6


def test_findings_below_the_noise_floor_are_dropped():
    b = EngineTraceBuilder()
    b.steps(30, batch=1, nested={"preprocess": [("logging.debug", 0.05, {})]})  # 0.2% of a ~23 ms token
    assert run_rules(Analysis(b.build())) == []


def test_sampled_leaf_line_names_the_c_call_it_makes(tmp_path):
    """np.concatenate has no Python frame: a sample inside it names it through its source line."""
    from llmtrace.analyze.functions import line_callee

    mod = tmp_path / "padmod.py"
    mod.write_text("import numpy as np\n\ndef pad(a, b):\n    return np.concatenate([a, b])\n")
    import sys as _sys

    _sys.path.insert(0, str(tmp_path))
    try:
        assert line_callee("padmod:pad:4") == "numpy.concatenate"
        assert line_callee("padmod:pad:3") is None
        assert line_callee("padmod:pad") is None
    finally:
        _sys.path.remove(str(tmp_path))


def _streaming_trace(ids_of) -> Analysis:
    """A loop thread: forward (2 ms, batch 4), then one detokenize call per sequence whose
    time is 10 us + 0.5 us per id decoded, `ids_of(step, seq)` ids."""
    from test_profile import MS as P_MS
    from test_profile import done, span, trace_of

    t = trace_of(1)
    for k in range(40):
        start = k * 4.0
        span(t, "forward", start, start + 2, batch=4)
        at = start + 2
        for seq in range(4):
            n = ids_of(k, seq)
            dur = (10_000 + 500 * n) / P_MS
            span(t, "detokenize", at, at + dur, ids=n)
            at += dur
    return done(t)


def test_detokenize_whole_sequence_when_each_call_decodes_the_sequence_again():
    ctx = _streaming_trace(lambda step, seq: 100 + 20 * seq + step)  # prompt + output so far
    s = _one(ctx, "detokenize-whole-sequence")
    ids = [100 + 20 * seq + k for k in range(39) for seq in range(4)]  # the 39 complete steps
    expected_ms = sum(0.5e-3 * (n - 8) for n in ids) / (39 * 4)
    assert s.stage == "detokenize" and s.est_saving_ms_per_token == pytest.approx(expected_ms, rel=0.1)
    assert s.evidence["median_ids_per_call"] > 100


def test_no_detokenize_finding_for_incremental_decoding():
    found = run_rules(_streaming_trace(lambda step, seq: 1 + step % 5))  # the new ids only
    assert "detokenize-whole-sequence" not in {s.id for s in found}


def _handler_loop_trace(batch: int) -> Analysis:
    """Four requests open across a loop of forwards (2 ms of every 3 ms) of `batch` sequences."""
    from test_profile import done, span, trace_of

    t = trace_of(1)
    for r in range(4):
        span(t, "http.request", -1 + r * 0.1, 200, tid=10 + r)
    for k in range(60):
        span(t, "forward", k * 3.0, k * 3.0 + 2, batch=batch)
    return done(t)


def test_unbatched_requests_when_forwards_run_one_sequence_while_requests_wait():
    s = _one(_handler_loop_trace(batch=1), "unbatched-requests")
    # on a CPU only the step's non-model 1 ms is shared by the 4: 0.75 ms saved per token at least
    assert s.est_saving_ms_per_token == pytest.approx(0.75, rel=0.05)
    assert s.evidence["in_flight_p50"] == 4 and s.evidence["ms_per_token_if_flat"] == pytest.approx(2.25, rel=0.05)


def test_no_unbatched_finding_when_the_forwards_batch_the_requests():
    assert "unbatched-requests" not in {s.id for s in run_rules(_handler_loop_trace(batch=4))}


def test_a_failing_rule_costs_only_its_own_finding(monkeypatch):
    import types

    from llmtrace.analyze import rules
    from llmtrace.analyze.report import build_report, render_markdown, render_text

    def check(ctx):
        raise KeyError("steps")

    monkeypatch.setattr(rules, "RULES", (types.SimpleNamespace(ID="broken-rule", check=check),) + rules.RULES)
    b = EngineTraceBuilder()
    b.steps(30, batch=1, nested={"preprocess": [("logging.debug", 7.0, {})]})
    rep = build_report(b.build())
    assert rep["rule_errors"] == ["broken-rule: KeyError: 'steps'"]
    assert "log-in-hot-path" in {s["id"] for s in rep["suggestions"]}
    assert "broken-rule" in render_text(rep) and "broken-rule" in render_markdown(rep)


def test_the_masters_samples_while_it_waits_for_the_agent_are_not_gap():
    """The master thread idles in its event loop during agent.wait: those samples are the
    transport's wait, not unannotated work of the step (they had topped `gap` at 200x its time)."""
    b = EngineTraceBuilder()
    b.steps(30, batch=4)
    t = b.build()
    for w in (s for s in t.spans if s.name == "agent.wait"):
        for k in range(4):
            t.samples.append(
                Sample(
                    MASTER_PID,
                    MASTER_PID,
                    w.start_ns + (k + 1) * (w.end_ns - w.start_ns) // 5,
                    ("asyncio.base_events:BaseEventLoop.run_forever", f"selectors:select_{k % 2}"),
                )
            )
    t.sort()
    ctx = Analysis(t)
    assert not ctx.functions.select(stage="gap")


def test_unbatched_requests_fits_the_cost_per_token_when_forwards_vary():
    """Forwards of 8 to 64 tokens cost 0.5 ms + 25 us per token: a batch of 4 one-token
    sequences costs the step's time plus 3 tokens' worth, not 4 times the forward."""
    from test_profile import done, span, trace_of

    t = trace_of(1)
    for r in range(4):
        span(t, "http.request", -1 + r * 0.1, 400, tid=10 + r)
    at = 0.0
    for k in range(60):
        tokens = 8 * (1 + k % 8)
        dur = 0.5 + 0.025 * tokens
        span(t, "forward", at, at + dur, batch=1, tokens=tokens)
        at += dur + 1.0  # 1 ms of host work after each forward
    s = _one(done(t), "unbatched-requests")
    assert s.evidence["batch_cost"].startswith("fitted") and "25.00 us per token" in s.evidence["batch_cost"]
    walls = [0.5 + 0.025 * 8 * (1 + k % 8) + (1.0 if k < 59 else 0.0) for k in range(60)]
    batched = [w + 0.025 * 8 * (1 + k % 8) * 3 for k, w in enumerate(walls)]  # 3 more sequences' tokens
    expected = (sum(walls) - sum(b / 4 for b in batched)) / 60
    assert s.est_saving_ms_per_token == pytest.approx(expected, rel=0.05)
    assert s.evidence["ms_per_token_if_flat"] > s.est_saving_ms_per_token > 0


def test_a_saving_that_varies_by_step_gets_a_wide_interval():
    b = EngineTraceBuilder()
    for i in range(40):  # 20 ms in one step of four, 0 in the others
        b.step(batch=1, nested={"preprocess": [("logging.debug", 20.0, {})]} if i % 4 == 0 else None)
    s = _one(Analysis(b.build()), "log-in-hot-path")
    lo, hi = s.interval
    assert lo < s.est_saving_ms_per_token < hi and hi - lo > 0.2 * s.est_saving_ms_per_token
    assert s.to_dict()["est_saving_interval"] == [lo, hi]


@pytest.mark.parametrize("nonblocking", [False, True])
def test_wait_in_step_only_for_receives_that_may_wait(nonblocking):
    """A 1 ms queue get in every step that no sender ended: a wait for work, unless it was
    asked not to wait (a get_nowait slowed by a busy CPU)."""
    from test_profile import done, span, trace_of

    t = trace_of(1)
    attrs = {"nonblocking": 1} if nonblocking else {}
    for k in range(30):
        span(t, "ipc.get", k * 4.0, k * 4.0 + 1, **attrs)
        span(t, "forward", k * 4.0 + 1, k * 4.0 + 3, batch=4)
    found = {s.id for s in run_rules(done(t))}
    assert ("wait-in-step" in found) != nonblocking


def test_rules_run_after_the_rules_whose_claims_they_read_in_any_listed_order():
    from types import SimpleNamespace

    from llmtrace.analyze.rules import ordered

    for listing in (RULES, tuple(reversed(RULES))):
        ids = [r.ID for r in ordered(listing)]
        assert ids[-1] == "hot-function-in-stage"
        assert ids.index("log-in-hot-path") < ids.index("concat-padding")
        assert ids.index("tcp-nodelay") < ids.index("wait-in-step")
    a, b = SimpleNamespace(ID="a", AFTER=("b",)), SimpleNamespace(ID="b", AFTER=("a",))
    with pytest.raises(ValueError, match="cycle"):
        ordered([a, b])


def test_full_logits_received_from_the_process_that_computed_them():
    """A front that samples the logits its model worker sends over a multiprocessing queue:
    the send is on the worker's feeder thread, off the path; the front's receive of 128 KiB
    per sequence is on it, from the worker's put on (2.5 ms of each 15 ms step, 4 tokens)."""
    s = _one(Analysis(mp_queue_trace(read_bytes=4 * 128 * 1024)), "full-logits-transfer")
    device = 4 * 128 * 1024 / 1e10 * 1e3  # ms: the logits read once on the host
    assert s.est_saving_ms_per_token == pytest.approx((2.5 - device) / 4, rel=0.01)
    assert "full-logits-transfer" not in [x.id for x in run_rules(Analysis(mp_queue_trace(read_bytes=64)))]
