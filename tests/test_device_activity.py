"""Device busy time from kernel records (llmtrace/device_activity.py) without a GPU: Kineto's
events are stand-ins with its accessors, CUDA events complete at once; the mapping, the
instants, their join to the spans and the breakdown's split are the real code."""

import time

import pytest
from synthetic import AGENT_PID, MASTER_PID, EngineTraceBuilder

import llmtrace
from engine.trace_resource import SETTINGS
from llmtrace import device_activity, gpu, names, recorder
from llmtrace.analyze.analysis import Analysis
from llmtrace.analyze.breakdown import DEVICE_IDLE, MODEL
from llmtrace.analyze.report import build_report, render_markdown
from llmtrace.analyze.rules import run_rules
from llmtrace.device_activity import ModelSpan, busy_by_span, union_ns
from llmtrace.load import load_trace

US = 1_000


class KinetoEvent:
    def __init__(self, kind, start_ns, dur_ns, corr):
        self.kind, self.t, self.d, self.corr = kind, start_ns, dur_ns, corr

    def activity_type(self):
        return self.kind

    def start_ns(self):
        return self.t

    def duration_ns(self):
        return self.d

    def correlation_id(self):
        return self.corr


def launch(t, corr, offset=0):
    return KinetoEvent("cuda_runtime", t + offset, 2 * US, corr)


def test_union_counts_overlap_once():
    assert union_ns([(0, 10), (5, 20), (30, 40), (31, 35)]) == 30
    assert union_ns([]) == 0


def test_each_spans_busy_time_is_the_union_of_the_kernels_it_launched():
    offset = 7_000_000_000  # Kineto's clock (Unix) minus llmtrace's
    spans = [
        ModelSpan(1000 * US, 1100 * US, span_id=11, step=1),
        ModelSpan(2000 * US, 2100 * US, 12, 2),
        ModelSpan(2010 * US, 2050 * US, 13, 2),
    ]  # 13 nests in 12: its launches are its own
    gpu_t = 5_000 * US
    events = [
        launch(1010 * US, 1, offset),
        KinetoEvent("kernel", gpu_t, 100 * US, 1),
        launch(1020 * US, 2, offset),
        KinetoEvent("kernel", gpu_t + 150 * US, 50 * US, 2),
        launch(1030 * US, 3, offset),
        KinetoEvent("gpu_memcpy", gpu_t + 180 * US, 40 * US, 3),  # overlaps: 20 more
        KinetoEvent("cuda_sync", gpu_t, 1000 * US, 3),  # a sync record is no device work
        launch(2005 * US, 4, offset),  # a CUDA graph: one launch, three kernels
        *[KinetoEvent("kernel", gpu_t + 1000 * US + i * 30 * US, 20 * US, 4) for i in range(3)],
        launch(2020 * US, 5, offset),
        KinetoEvent("kernel", gpu_t + 2000 * US, 10 * US, 5),
        launch(1500 * US, 6, offset),
        KinetoEvent("kernel", gpu_t + 3000 * US, 10 * US, 6),  # between spans
        launch(9000 * US, 7, offset),
        KinetoEvent("kernel", gpu_t + 4000 * US, 10 * US, 7),  # after the window
    ]
    found, outside = busy_by_span(events, spans, offset)
    got = {b.span.span_id: (b.busy_ns, b.kernels, b.launches) for b in found}
    assert got == {11: (170 * US, 3, 3), 12: (60 * US, 3, 1), 13: (10 * US, 1, 1)}
    assert outside == 1


def test_clock_offset_is_unix_minus_monotonic():
    expect = time.time_ns() - time.perf_counter_ns()
    assert abs(device_activity.clock_offset_ns() - expect) < 5_000_000


def test_window_size_comes_from_the_environment(monkeypatch, capsys):
    monkeypatch.setenv(device_activity.ENV, "300")
    assert device_activity.window_from_env() == 300
    monkeypatch.setenv(device_activity.ENV, "all")
    assert device_activity.window_from_env() == 0
    assert "not a number" in capsys.readouterr().err


# ---- a DeviceTimer with a window, over stand-ins for CUDA events and the profiler ------------


class Event:
    def __init__(self, enable_timing=False):
        self.t = 0

    def record(self):
        self.t = time.perf_counter_ns()

    def query(self):
        return True

    def synchronize(self):
        pass

    def elapsed_time(self, other):
        return (other.t - self.t) / 1e6


class Cuda:
    Event = Event

    @staticmethod
    def synchronize():
        pass


class Torch:
    cuda = Cuda


class Profiler:
    """torch.profiler.profile's surface that the window uses; kernels: built by the test."""

    def __init__(self):
        self.recorded = []
        self.profiler = self

    def events(self):
        return self.recorded

    @property
    def kineto_results(self):
        return self

    def start(self):
        pass

    def stop(self):
        pass


def test_window_spans_get_their_busy_time_and_the_breakdown_splits_it(tmp_path):
    llmtrace.configure(out=str(tmp_path), process_name="agent", propagate=False)
    prof = Profiler()
    window = device_activity.Window(2, prof)
    timer = gpu.DeviceTimer(Torch, window)
    recorder.set_device_hook(timer)
    try:
        for step in range(4):
            with llmtrace.span("forward", step=step, device=True):
                time.sleep(0.002)
            timer.poll()
    finally:
        recorder.set_device_hook(None)
    assert window.complete and len(window.spans) == 2  # complete once the 2nd span finished on the device
    for i, s in enumerate(window.spans):  # each span: one launch of two kernels, busy half its device time
        t = s.start_ns + window.offset_ns + 100 * US
        dev = (s.end_ns - s.start_ns) // 4
        prof.recorded += [
            launch(t, i + 1),
            KinetoEvent("kernel", 0, dev, i + 1),
            KinetoEvent("kernel", dev, dev, i + 1),
        ]
    gpu._timer = timer  # as gpu.install() leaves it: the flush thread's poll reads a complete window
    try:
        gpu.poll()
    finally:
        gpu._timer = None
    assert window.emitted and timer.window is None
    llmtrace.shutdown()
    trace = load_trace(str(tmp_path))
    fwd = sorted((s for s in trace.spans if s.name == "forward"), key=lambda s: s.step)
    assert [names.A_BUSY_NS in s.attrs for s in fwd] == [True, True, False, False]
    assert fwd[0].attrs[names.A_KERNELS] == 2 and fwd[0].attrs[names.A_LAUNCHES] == 1
    assert fwd[0].attrs[names.A_BUSY_NS] / fwd[0].device_dur_ns == pytest.approx(0.5, abs=0.05)
    assert not any(i.name == names.I_DEVICE_BUSY for i in trace.instants)  # joined, not left as instants


def _launch_bound_trace(busy_share: float, launches: int, kernels: int = 300):
    b = EngineTraceBuilder()
    b.steps(30, batch=8, device={"forward": 10.0, "sampling": 0.5})
    trace = b.build()
    trace.processes[MASTER_PID].header["resource"][names.R_SETTINGS] = SETTINGS
    for s in trace.spans:
        if s.pid == AGENT_PID and s.name in ("forward", "sampling") and s.step < 20:  # a window of 20 steps
            s.attrs.update(
                {
                    names.A_BUSY_NS: int(s.device_dur_ns * busy_share),
                    names.A_KERNELS: kernels,
                    names.A_LAUNCHES: launches,
                }
            )
    return trace


def test_breakdown_moves_the_idle_share_of_device_time_out_of_the_model():
    plain = Analysis(_launch_bound_trace(1.0, 300)).breakdown
    ctx = Analysis(_launch_bound_trace(0.5, 300))
    bd = ctx.breakdown
    for before, after in zip(plain.steps, bd.steps):
        assert after.wall_ns == before.wall_ns == sum(after.parts.values())
        if after.step < 20:
            assert after.parts[DEVICE_IDLE] == pytest.approx(before.parts[MODEL] / 2, rel=0.02)
        else:
            assert DEVICE_IDLE not in after.parts and after.parts[MODEL] == before.parts[MODEL]
    assert ctx.device.spans == 40 and ctx.device.timed_spans == 60
    assert ctx.device.idle_share == pytest.approx(0.5, abs=0.01)


def test_launch_bound_fires_on_eager_idle_time_with_a_saving_beyond_a_graphs_gaps():
    ctx = Analysis(_launch_bound_trace(0.5, launches=300))
    (s,) = [s for s in run_rules(ctx) if s.id == "launch-bound"]
    assert "eager" in s.title and "CUDA graph" in s.fix
    assert "`engine.cuda_graphs`" in s.fix  # the engine declares its setting
    model = ctx.breakdown.ms_per_token(MODEL) + ctx.breakdown.ms_per_token(DEVICE_IDLE)
    d = ctx.device
    expect = model * (d.idle_ns - d.kernels * 1_500) / d.device_ns
    assert s.est_saving_ms_per_token == pytest.approx(expect, rel=0.01)
    assert s.evidence["spans"] == 40 and s.evidence["launches_per_span"] == 300
    report = build_report(_launch_bound_trace(0.5, 300))
    assert "idle 50.0% between kernels" in render_markdown(report)


def test_launch_bound_is_silent_when_the_device_is_busy_or_graphs_leave_only_their_gaps():
    assert not [s for s in run_rules(Analysis(_launch_bound_trace(0.95, 300))) if s.id == "launch-bound"]
    # graphs (one launch) with idle time that is all graph gaps: no saving to promise
    ctx = Analysis(_launch_bound_trace(0.85, launches=1, kernels=3000))
    assert not [s for s in run_rules(ctx) if s.id == "launch-bound"]
