"""Synthetic engine traces for the analyzer's tests.

`EngineTraceBuilder` lays out steps the way the engine records them (docs/architecture.md):
master.step with its stages around agent.wait, the agent's agent.step with preprocess,
forward/sampling (device times on a GPU), sync.wait, plus the master's counters. Each
stage's host duration, the device times, transport latency, nested spans (antipattern
fingerprints) and the step's gap are parameters, so a test knows the exact cost it
injected. `record_pipeline` records a real (not synthetic) trace of a small pipeline.
"""

from __future__ import annotations

import itertools
import time

import llmtrace
from engine.trace_resource import PROFILE as ENGINE_PROFILE
from llmtrace import names
from llmtrace.timeline import CounterSample, Instant, Process, Span, Trace

MS = 1_000_000
MASTER_PID, AGENT_PID = 1000, 2000
MASTER_BEFORE = {"schedule": 0.3, "shm.write": 0.1, "tcp.send": 0.05}
MASTER_AFTER = {"tcp.recv": 0.05, "shm.read": 0.05, "postprocess": 0.3, "detokenize": 0.2, "stream.write": 0.1}
MASTER_OUTPUT = ("detokenize", "stream.write")  # what the engine defers into the next step's agent.wait
AGENT_STAGES = {
    "tcp.recv": 0.05,
    "shm.read": 0.05,
    "preprocess": 0.5,
    "forward": 0.2,
    "sampling": 0.1,
    "sync.wait": 0.0,
    "shm.write": 0.05,
    "tcp.send": 0.05,
}
DEVICE = {"forward": 20.0, "sampling": 0.5}
LAUNCH_DELAY_MS = 0.01
IDLE_BETWEEN_STEPS_MS = 0.1


def _ms(x: float) -> int:
    return int(round(x * MS))


class EngineTraceBuilder:
    """gpu: forward/sampling run on a device, sync.wait blocks until it is done.
    device_timing: forward/sampling carry CUDA-event device times (False = host-timed GPU)."""

    def __init__(
        self,
        gpu: bool = True,
        device_timing: bool = True,
        span_cost_ns: float = 300.0,
        max_num_seqs: int | None = None,
        kv_blocks_total: int | None = None,
    ):
        self.gpu, self.device_timing = gpu, gpu and device_timing
        self.trace = Trace()
        self._seq: dict[int, itertools.count] = {}
        for pid, name in ((MASTER_PID, "master"), (AGENT_PID, "agent-0")):
            self.process(pid, name, span_cost_ns)
        self.trace.processes[MASTER_PID].header["resource"] = {names.R_PROFILE: ENGINE_PROFILE.to_resource()}
        self.t = 1_000 * MS
        self.next_step = 0
        self.kv_blocks_total = kv_blocks_total
        if max_num_seqs is not None:  # the master's resource, as engine/trace_resource.py writes it
            self.trace.processes[MASTER_PID].header["resource"][names.R_MAX_NUM_SEQS] = max_num_seqs

    # -- low level -------------------------------------------------------------------
    def process(self, pid: int, name: str, span_cost_ns: float = 300.0) -> None:
        self.trace.processes[pid] = Process(pid, name, {"pid": pid, "process_name": name, "span_cost_ns": span_cost_ns})
        self._seq[pid] = itertools.count(1)

    def span(self, pid, name, start, end, parent=None, step=-1, attrs=None, stage=None, device=None) -> Span:
        sid = (pid << 40) | next(self._seq[pid])
        s = Span(
            name,
            stage or name.split(".", 1)[0],
            pid,
            pid,
            start,
            end,
            sid,
            parent.span_id if parent else 0,
            0,
            step,
            dict(attrs or {}),
        )
        if device is not None:
            s.device_start_ns, s.device_end_ns = device
        self.trace.spans.append(s)
        return s

    def counter(self, name, value, ts=None):
        self.trace.counters.append(CounterSample(name, MASTER_PID, self.t if ts is None else ts, float(value)))

    def instant(self, name, ts=None, step=-1, pid=MASTER_PID, **attrs):
        self.trace.instants.append(
            Instant(name, name.split(".", 1)[0], pid, pid, self.t if ts is None else ts, step, 0, attrs)
        )

    # -- one engine step ---------------------------------------------------------------
    def step(
        self,
        batch: int = 8,
        prefill: bool = False,
        *,
        master: dict | None = None,
        agent: dict | None = None,
        device: dict | None = None,
        nested: dict | None = None,
        transport_ms: float = 0.05,
        reply_ms: float = 0.05,
        gap_ms: float = 0.0,
        waiting: int = 0,
        kv_used: int | None = None,
        agent_order: list[str] | None = None,
        attrs: dict | None = None,
        span_attrs: dict | None = None,
        output_in_wait: bool = False,
    ) -> int:
        """Append one step; returns its step id.

        master/agent: host ms per stage overriding the defaults; device: device ms of
        forward/sampling; nested: {stage span name: [(name, ms, attrs)]} spans laid at the
        start of that stage span (which grows by their time; agent stages first);
        gap_ms: time inside master.step in no stage; span_attrs: {agent stage: attrs};
        output_in_wait: as the engine does, the previous step's detokenize/stream.write
        (their `master` durations, step id one less) run inside agent.wait from its start,
        and this step ends at postprocess; the wait ends at the later of them and the reply.
        """
        step, nested = self.next_step, nested or {}
        self.next_step += 1
        self.counter("batch_size", batch)
        self.counter("running", batch)
        self.counter("waiting", waiting)
        if kv_used is not None:
            self.counter("kv_blocks_used", kv_used)
            if self.kv_blocks_total is not None:
                self.counter("kv_blocks_total", self.kv_blocks_total)
        m_before = {**MASTER_BEFORE, **{k: v for k, v in (master or {}).items() if k in MASTER_BEFORE}}
        m_after = {**MASTER_AFTER, **{k: v for k, v in (master or {}).items() if k not in MASTER_BEFORE}}
        a_stages = {**AGENT_STAGES, **(agent or {})}
        dev = {**DEVICE, **(device or {})}
        root = self.span(
            MASTER_PID,
            "master.step",
            self.t,
            0,
            step=step,
            attrs={"batch": batch, "tokens": batch, "prefill": int(prefill), **(attrs or {})},
        )
        t = self._stages(MASTER_PID, root, m_before, self.t, step, nested, skip=set(AGENT_STAGES))
        wait = self.span(MASTER_PID, "agent.wait", t, 0, root, step)
        busy_until = t
        if output_in_wait:
            for name in MASTER_OUTPUT:
                busy_until = self._stage(MASTER_PID, wait, name, m_after.pop(name), busy_until, step - 1, ())
        a_end = self._agent_step(t + _ms(transport_ms), step, a_stages, dev, nested, agent_order, span_attrs or {})
        wait.end_ns = max(a_end + _ms(reply_ms), busy_until)
        t = self._stages(MASTER_PID, root, m_after, wait.end_ns, step, nested, skip=set(AGENT_STAGES))
        root.end_ns = t + _ms(gap_ms)
        self.t = root.end_ns + _ms(IDLE_BETWEEN_STEPS_MS)
        return step

    def _stages(self, pid, parent, stages, t, step, nested, skip=()):
        for name, ms in stages.items():
            t = self._stage(
                pid, parent, name, ms, t, step, [] if name in skip and pid == MASTER_PID else nested.get(name, ())
            )
        return t

    def _stage(self, pid, parent, name, ms, t, step, nested_spans, device=None, attrs=None):
        s = self.span(pid, name, t, 0, parent, step, attrs, device=device)
        u = t
        for n_name, n_ms, n_attrs in nested_spans:
            self.span(pid, n_name, u, u + _ms(n_ms), s, step, n_attrs)
            u += _ms(n_ms)
        s.end_ns = u + _ms(ms)
        return s.end_ns

    def _agent_step(self, t, step, stages, dev, nested, order, span_attrs):
        root = self.span(AGENT_PID, "agent.step", t, 0, step=step)
        device_free = t
        for name in order or list(stages):
            ms = stages.get(name, AGENT_STAGES.get(name, 0.0))
            if name == "sync.wait":
                if not self.gpu:
                    continue
                end = max(t + _ms(ms), device_free + _ms(LAUNCH_DELAY_MS))
                t = self._stage(AGENT_PID, root, name, (end - t) / MS, t, step, ())
                continue
            device = None
            if self.gpu and name in dev and dev[name]:
                d0 = max(t + _ms(LAUNCH_DELAY_MS), device_free)
                device_free = d0 + _ms(dev[name])
                device = (d0, device_free) if self.device_timing else None
            elif not self.gpu and name in dev:
                ms = dev[name]  # CPU: the model runs on the host inside the span
            t = self._stage(AGENT_PID, root, name, ms, t, step, nested.get(name, ()), device, span_attrs.get(name))
        root.end_ns = t
        return t

    # -- requests ------------------------------------------------------------------------
    def request(self, req: str, start: int, token_ts: list[int], queue_ns: int = 0) -> None:
        """An HTTP request arriving at `start` whose tokens were streamed at `token_ts`."""
        self.span(MASTER_PID, "http.request", start, token_ts[-1], attrs={"req": req, "output_tokens": len(token_ts)})
        self.span(MASTER_PID, "queue", start, start + queue_ns, attrs={"req": req})
        for n, ts in enumerate(token_ts, 1):
            self.instant("token", ts, req=req, n=n)
        self.instant("req.finish", token_ts[-1], req=req, reason="length")

    def build(self) -> Trace:
        self.trace.sort()
        return self.trace

    def steps(self, n: int, **kw) -> list[int]:
        return [self.step(**kw) for _ in range(n)]


def clean_trace(n: int = 50, **kw) -> Trace:
    b = EngineTraceBuilder(**kw)
    b.steps(n)
    return b.build()


def _render_tokens(seconds: float) -> None:
    """Stands for a slow helper inside a stage, busy on the CPU: only stack samples can name it."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def record_pipeline(
    out, steps: int = 50, inject_s: float = 0.0005, helper_s: float = 0.0, sample_hz: float = 0.0
) -> int:
    """Record a REAL trace, in this process, of a small generic pipeline (llmtrace spans, one
    step per token) with `time.sleep(inject_s)` inside `postprocess` (plus `helper_s` in a
    helper function with no span, for the stack sampler); returns the ns slept in both."""
    from llmtrace import recorder

    recorder.drain()  # records an earlier test left in this process are not this pipeline's
    slept = 0
    llmtrace.configure(enabled=True, out=str(out), process_name="pipeline", sample_hz=sample_hz, propagate=False)
    try:
        for i in range(steps):
            with llmtrace.span("step", step=i, batch=1):
                with llmtrace.span("preprocess"):
                    sum(range(200))
                with llmtrace.span("forward"):
                    time.sleep(0.001)
                with llmtrace.span("postprocess"):
                    t = time.perf_counter_ns()
                    time.sleep(inject_s)
                    if helper_s:
                        _render_tokens(helper_s)
                    slept += time.perf_counter_ns() - t
    finally:
        llmtrace.shutdown()
    return slept


def drain_recorded_trace() -> Trace:
    """Everything this process has recorded so far (no sink), decoded into a Trace."""
    from llmtrace.load import drain_recorded

    return drain_recorded("test")


def pipelined_trace() -> Trace:
    """Three async-scheduled steps by hand (ms): the device runs steps 0, 1, 2 back to back
    over [1, 11), [11, 21), [21, 31); master.step 0 spans [0, 12), master.step n
    [10n + 2, 10n + 12); agent.step n
    holds the launch of step n+1 (its forward, a span of step n+1) and waits for step n."""
    b = EngineTraceBuilder()
    m = lambda x: int(x * MS)  # noqa: E731
    dev = {0: (1, 11), 1: (11, 21), 2: (21, 31)}
    launches = {0: (0, 0.7), 1: (0, 2.0), 2: (1, 12.3)}  # step: (agent step it runs in, host start)
    agents = {}
    for n in range(3):
        lo, hi = 10 * n + (0 if n == 0 else 2), 10 * n + 12
        root = b.span(MASTER_PID, "master.step", m(lo), m(hi), step=n, attrs={"batch": 4, "prefill": 0})
        b.span(MASTER_PID, "schedule", m(lo), m(lo + 0.1), root, n)
        b.span(MASTER_PID, "agent.wait", m(lo + 0.2), m(hi - 0.5), root, n)
        b.span(MASTER_PID, "postprocess", m(hi - 0.3), m(hi), root, n)
        agents[n] = b.span(AGENT_PID, "agent.step", m(lo + 0.3 if n == 0 else hi - 10.7), m(hi - 0.7), step=n)
        b.span(AGENT_PID, "sync.wait", m(hi - 9.5), m(hi - 0.9), agents[n], n)
    for n, (parent, t) in launches.items():
        b.span(AGENT_PID, "forward", m(t), m(t + 0.2), agents[parent], n, device=tuple(m(x) for x in dev[n]))
    return b.build()


def mp_queue_trace(read_bytes: int = 64) -> Trace:
    """A numpy-style worker process (forward 10 ms, batch 4) and its front over two
    multiprocessing queues, one step every 15 ms (ms from each step's start): the worker puts
    its output at 10, its feeder thread sends it [10.2, 12); the front, waiting in its get
    since 9, reads `read_bytes` by 12.5, works 0.5 ms, sleeps [13, 14.5), puts at 14.5, and
    its feeder sends [14.7, 14.9); the worker waits in its get [10.1, 15)."""
    front, worker, front_feeder, worker_feeder = 1, 2, 11, 21
    spans: list[Span] = []

    def add(pid, tid, name, stage, a, b, parent=0, **attrs):
        spans.append(Span(name, stage, pid, tid, int(a), int(b), len(spans) + 1, parent, attrs=attrs))
        return len(spans)

    for n in range(6):
        t = n * 15 * MS
        add(worker, worker, names.FORWARD, names.FORWARD, t, t + 10 * MS, batch=4)
        add(worker, worker, "ipc.put", names.IPC, t + 10 * MS, t + 10.1 * MS)
        add(worker, worker_feeder, "ipc.send", names.IPC, t + 10.2 * MS, t + 12 * MS, bytes=read_bytes)
        get = add(worker, worker, "ipc.get", names.IPC, t + 10.1 * MS, t + 15 * MS)
        recv = add(worker, worker, "ipc.recv", names.IPC, t + 10.1 * MS, t + 15 * MS, get)
        add(worker, worker, names.PIPE_READ, names.IPC, t + 10.1 * MS, t + 15 * MS, recv, bytes=64)
        get = add(front, front, "ipc.get", names.IPC, t + 9 * MS, t + 12.5 * MS)
        recv = add(front, front, "ipc.recv", names.IPC, t + 9 * MS, t + 12.5 * MS, get)
        add(front, front, names.PIPE_READ, names.IPC, t + 9 * MS, t + 12.5 * MS, recv, bytes=read_bytes)
        add(front, front, "sleep", names.SLEEP, t + 13 * MS, t + 14.5 * MS)
        add(front, front, "ipc.put", names.IPC, t + 14.5 * MS, t + 14.6 * MS)
        add(front, front_feeder, "ipc.send", names.IPC, t + 14.7 * MS, t + 14.9 * MS, bytes=64)
    trace = Trace(spans=spans)
    for pid, name, feeder in ((front, "front", front_feeder), (worker, "worker", worker_feeder)):
        trace.processes[pid] = Process(pid, name, threads={pid: "MainThread", feeder: "QueueFeederThread"})
    return trace
