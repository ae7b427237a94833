"""What the TUI shows, aggregated incrementally from records as they arrive.

Steps: a step's spans (every process's, grouped by step id) are costed once, by the
analyzer's own `Breakdown`, once the parents its spans name have arrived and nothing of
it has arrived for `settle_s` (every process flushes its spool every 50 ms). The stage table is
the analyzer's view over the last `window` steps; the suggestions are the analyzer's rules
run on the spans of that window (`window_trace`). Requests: one row per request, updated
by its `http.request`/`queue` spans and `token`/`req.finish` instants.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field

from llmtrace.analyze.breakdown import Breakdown, StepCost, breakdown_view
from llmtrace.analyze.index import TraceIndex
from llmtrace.analyze.report_schema import BreakdownView
from llmtrace.analyze.stats import summary
from llmtrace.timeline import CounterSample, Instant, Process, Sample, Span, Trace

ALL, DECODE, PREFILL = PHASES = ("all", "decode", "prefill")  # which steps a breakdown covers
SETTLE_S = 0.5
STALE_S = 10.0
WINDOW_STEPS = 512  # steps behind the live stage table, call chains and suggestions
SERIES_POINTS = 4096  # step-time / batch-size history for the sparklines
THROUGHPUT_S = 5.0  # live throughput: tokens of the steps that ended in the last seconds
RECENT_RECORDS = 1 << 16  # counters / instants / samples kept for the windowed suggestions
RECENT_GROUPS = 8  # costed steps whose span ids still count as arrived parents
COSTED_IDS = 1 << 14  # costed step ids remembered, to keep a late span from opening its step again


@dataclass(slots=True)
class RequestRow:
    req: str
    arrival_ns: int | None = None
    queue_ns: int | None = None
    ttft_ns: int | None = None  # from the http.request span's ttft_us, else the first token
    first_token_ns: int | None = None
    tokens: int = 0
    finish_ns: int | None = None
    reason: str = ""

    @property
    def done(self) -> bool:
        return self.finish_ns is not None

    @property
    def ttft(self) -> int | None:
        if self.ttft_ns is not None:
            return self.ttft_ns
        if self.first_token_ns is not None and self.arrival_ns is not None:
            return self.first_token_ns - self.arrival_ns
        return None

    @property
    def e2e(self) -> int | None:
        if self.finish_ns is None or self.arrival_ns is None:
            return None
        return self.finish_ns - self.arrival_ns

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first (the report's definition)."""
        e2e, ttft = self.e2e, self.ttft
        if e2e is None or ttft is None or self.tokens < 2:
            return None
        return (e2e - ttft) / (self.tokens - 1)


@dataclass
class StepView:
    cost: StepCost
    spans: list[Span]  # every span of the step, all processes, by start time


@dataclass
class _OpenStep:
    spans: list[Span] = field(default_factory=list)
    seen: float = 0.0  # when its latest span arrived
    ids: set[int] = field(default_factory=set)
    # Parents named by its spans that have not arrived: a span is recorded when it ends, so
    # the master's stages arrive before master.step, and the agent's before agent.step.
    missing: set[int] = field(default_factory=set)

    def add(self, s: Span, now: float) -> None:
        self.spans.append(s)
        self.seen = now
        self.ids.add(s.span_id)
        self.missing.discard(s.span_id)
        if s.parent_id and s.parent_id not in self.ids:
            self.missing.add(s.parent_id)


class RunModel:
    def __init__(
        self,
        settle_s: float = SETTLE_S,
        window: int | None = WINDOW_STEPS,
        series: int | None = SERIES_POINTS,
        clock=time.monotonic,
    ):
        self.settle_s, self.clock = settle_s, clock
        self.processes: dict[int, Process] = {}
        self.steps: deque[StepView] = deque(maxlen=window)
        self.step_ms: deque[float] = deque(maxlen=series)
        self.batch: deque[float] = deque(maxlen=series)
        self.requests: dict[str, RequestRow] = {}
        self.steps_total = 0
        self.tokens_total = 0
        self.records_total = 0
        self._open: dict[int, _OpenStep] = {}
        self._ends: deque[tuple[int, int]] = deque()  # (root end, tokens) of the last THROUGHPUT_S
        self._first_start_ns: int | None = None
        self._last_end_ns: int | None = None
        self._counters: deque[CounterSample] = deque(maxlen=RECENT_RECORDS)
        self._instants: deque[Instant] = deque(maxlen=RECENT_RECORDS)
        self._samples: deque[Sample] = deque(maxlen=RECENT_RECORDS)
        self._unstepped: deque[Span] = deque(maxlen=RECENT_RECORDS)  # spans outside steps (requests, user)
        self._costed: dict[int, None] = {}  # ids of the latest costed steps (insertion-ordered set)
        self._recent_ids: deque[set[int]] = deque(maxlen=RECENT_GROUPS)  # span ids of the last costed steps
        self.late_spans = 0
        self.version = 0  # bumped whenever something visible changed

    # -- ingest ------------------------------------------------------------------------
    def ingest(self, new: Trace) -> None:
        """Take the records of `new` (a poll of the feed, or a whole loaded trace)."""
        self.processes.update(new.processes)
        now = self.clock()
        for s in new.spans:
            if s.step >= 0:
                if s.step in self._costed:
                    self.late_spans += 1  # its step was costed already: a process flushed very late
                    continue
                st = self._open.get(s.step)
                if st is None:
                    st = self._open[s.step] = _OpenStep()
                st.add(s, now)
            else:
                self._unstepped.append(s)
            if s.name == "http.request" or s.name == "queue":
                self._request_span(s)
        for i in new.instants:
            if i.name == "token" or i.name == "req.finish":
                self._request_instant(i)
            else:
                self._instants.append(i)
        self._counters.extend(new.counters)
        self._samples.extend(new.samples)
        n = len(new.spans) + len(new.instants) + len(new.counters) + len(new.samples)
        if n:
            self.records_total += n
            self.version += 1

    def _row(self, req) -> RequestRow:
        key = str(req)
        row = self.requests.get(key)
        if row is None:
            row = self.requests[key] = RequestRow(key)
        return row

    def _request_span(self, s: Span) -> None:
        if "req" not in s.attrs:
            return
        row = self._row(s.attrs["req"])
        row.arrival_ns = s.start_ns if row.arrival_ns is None else min(row.arrival_ns, s.start_ns)
        if s.name == "queue":
            row.queue_ns = s.dur_ns
            return
        if row.finish_ns is None:
            row.finish_ns = s.end_ns
        if "ttft_us" in s.attrs:
            row.ttft_ns = int(s.attrs["ttft_us"] * 1000)
        if "output_tokens" in s.attrs:
            row.tokens = int(s.attrs["output_tokens"])

    def _request_instant(self, i: Instant) -> None:
        if "req" not in i.attrs:
            return
        row = self._row(i.attrs["req"])
        if i.name == "req.finish":
            row.finish_ns = i.ts_ns if row.finish_ns is None else min(row.finish_ns, i.ts_ns)
            row.reason = str(i.attrs.get("reason", ""))
            return
        if row.first_token_ns is None or i.ts_ns < row.first_token_ns:
            row.first_token_ns = i.ts_ns
        row.tokens = max(row.tokens, int(i.attrs.get("n", row.tokens + 1)))

    # -- steps ---------------------------------------------------------------------------
    def settle(self, everything: bool = False) -> int:
        """Cost the steps that are complete (all open ones when `everything`); returns how many.

        Complete: every parent its spans name has arrived (the roots end last) and nothing
        of it arrived for `settle_s` (every process flushes every 50 ms). A step whose
        parents stay missing (a root outside the step, a lost process) is costed after STALE_S.
        """
        now = self.clock()
        # A parent may sit in another step's group: with async scheduling agent.step n holds
        # the launch of step n+1 (spans of step n+1).
        present = set().union(*(st.ids for st in self._open.values()), *self._recent_ids)
        ready = [
            k
            for k, st in self._open.items()
            if everything or now - st.seen >= STALE_S or (now - st.seen >= self.settle_s and not st.missing - present)
        ]
        if not ready:
            return 0
        groups = {k: self._open.pop(k).spans for k in ready}
        self._costed.update(dict.fromkeys(ready))
        for k in list(itertools.islice(self._costed, max(0, len(self._costed) - COSTED_IDS))):
            del self._costed[k]
        # One index over the ready steps and those still open: a step's window can hold the
        # next step's device time and its agent step the next step's launch.
        spans = [x for g in groups.values() for x in g] + [x for st in self._open.values() for x in st.spans]
        spans.sort(key=lambda x: x.start_ns)
        views = [
            StepView(c, sorted(groups[c.step], key=lambda x: x.start_ns))
            for c in Breakdown.of(TraceIndex(Trace(self.processes, spans))).steps
            if c.step in groups
        ]
        views.sort(key=lambda v: v.cost.root.start_ns)
        for v in views:
            self._add_step(v)
        self._recent_ids.extend({x.span_id for x in g} for g in groups.values())
        self.version += 1
        return len(views)

    def _add_step(self, v: StepView) -> None:
        c = v.cost
        self.steps.append(v)
        self.step_ms.append(c.wall_ns / 1e6)
        self.batch.append(float(c.batch if c.batch is not None else c.tokens))
        self.steps_total += 1
        self.tokens_total += c.tokens
        self._ends.append((c.root.end_ns, c.tokens))
        if self._first_start_ns is None:
            self._first_start_ns = c.root.start_ns
        self._last_end_ns = max(self._last_end_ns or 0, c.root.end_ns)
        while self._ends and self._ends[0][0] < c.root.end_ns - THROUGHPUT_S * 1e9:
            self._ends.popleft()

    @property
    def pending_steps(self) -> int:
        return len(self._open)

    def step(self, step_id: int) -> StepView | None:
        return next((v for v in self.steps if v.cost.step == step_id), None)

    # -- views -----------------------------------------------------------------------------
    def breakdown_view(self, phase: str = ALL) -> BreakdownView | None:
        """The analyzer's breakdown over the window's steps: all, or only decode / prefill ones."""
        costs = [v.cost for v in self.steps]
        return breakdown_view(costs if phase == ALL else [c for c in costs if c.prefill == (phase == PREFILL)])

    def window_trace(self) -> Trace:
        """The window's steps (all their spans) with the counters, instants and samples of
        the same time range, for running the analyzer's rules on recent behaviour."""
        if not self.steps:
            return Trace(processes=dict(self.processes))
        t0 = self.steps[0].cost.root.start_ns
        spans = [s for v in self.steps for s in v.spans]
        spans += [s for s in self._unstepped if s.start_ns >= t0]
        trace = Trace(
            processes=dict(self.processes),
            spans=spans,
            instants=[i for i in self._instants if i.ts_ns >= t0],
            counters=[c for c in self._counters if c.ts_ns >= t0],
            samples=[s for s in self._samples if s.ts_ns >= t0],
        )
        trace.sort()
        return trace

    def live_summary(self) -> dict:
        """The header's numbers, in the report summary's keys, plus the recent token rate."""
        rows = self.requests.values()
        ttft = [r.ttft for r in rows if r.ttft is not None]
        tpot = [r.tpot for r in rows if r.tpot is not None]
        tokens = sum(r.tokens for r in rows) if self.requests else self.tokens_total
        return {
            "requests": len(self.requests) or None,
            "output_tokens": tokens,
            "steps": self.steps_total,
            "throughput_tok_s": _rate(self.tokens_total, self._first_start_ns, self._last_end_ns),
            "throughput_now_tok_s": _rate(sum(n for _, n in list(self._ends)[1:]), self._ends[0][0], self._last_end_ns)
            if self._ends
            else 0.0,
            "ttft_ms": summary(ttft, 1e-6),
            "tpot_ms": summary(tpot, 1e-6),
        }

    @property
    def requests_done(self) -> int:
        return sum(1 for r in self.requests.values() if r.done)


def _rate(tokens: int, t0: int | None, t1: int | None) -> float:
    return tokens / ((t1 - t0) / 1e9) if t0 is not None and t1 is not None and t1 > t0 else 0.0
