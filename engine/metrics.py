"""The server's Prometheus metrics: request histograms and counters, rendered as text.

Exposition format 0.0.4 (what `GET /metrics` serves). Gauges (running, waiting, KV
blocks) are read from the master at scrape time; per-request numbers are observed
when a request finishes. Single event loop, so no locks.
"""
from __future__ import annotations

import bisect
import math

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                     10.0, 30.0, 60.0)
TOKEN_BUCKETS_S = (0.001, 0.002, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)


def _fmt(v: float) -> str:
    if isinstance(v, int):
        return str(v)
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


def _label(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _header(name: str, help_: str, kind: str) -> list[str]:
    return [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]


class Histogram:
    """Cumulative-bucket histogram (upper bounds inclusive, as Prometheus defines `le`)."""

    def __init__(self, name: str, help_: str, buckets: tuple[float, ...]):
        self.name, self.help, self.bounds = name, help_, tuple(buckets)
        self.counts = [0] * (len(self.bounds) + 1)  # last slot: above every bound (+Inf)
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, v)] += 1
        self.sum += v
        self.count += 1

    def render(self) -> list[str]:
        lines = _header(self.name, self.help, "histogram")
        running = 0
        for bound, c in zip((*self.bounds, math.inf), self.counts):
            running += c
            lines.append(f'{self.name}_bucket{{le="{_fmt(bound)}"}} {running}')
        lines += [f"{self.name}_sum {_fmt(self.sum)}", f"{self.name}_count {self.count}"]
        return lines


class Counter:
    """Monotonic counter, optionally split by one label."""

    def __init__(self, name: str, help_: str, label: str | None = None):
        self.name, self.help, self.label = name, help_, label
        self.values: dict[str, float] = {}

    def inc(self, n: float = 1, label_value: str = "") -> None:
        self.values[label_value] = self.values.get(label_value, 0) + n

    def render(self) -> list[str]:
        lines = _header(self.name, self.help, "counter")
        if self.label is None:
            lines.append(f"{self.name} {_fmt(self.values.get('', 0))}")
        else:
            lines += [f'{self.name}{{{self.label}="{_label(k)}"}} {_fmt(v)}' for k, v in sorted(self.values.items())]
        return lines


# (metric name, key of Master.stats(), help)
GAUGES = (
    ("engine_requests_running", "running", "Requests in the running batch."),
    ("engine_requests_waiting", "waiting", "Requests waiting to be scheduled."),
    ("engine_kv_blocks_used", "kv_blocks_used", "KV-cache blocks in use."),
    ("engine_kv_blocks_total", "kv_blocks_total", "KV-cache blocks in the pool."),
)


class EngineMetrics:
    """Everything `GET /metrics` shows; the server calls `observe_request` once per request."""

    def __init__(self):
        self.ttft = Histogram("engine_time_to_first_token_seconds", "Time from request arrival to its first token.",
                              LATENCY_BUCKETS_S)
        self.tpot = Histogram("engine_time_per_output_token_seconds",
                              "Mean time between output tokens after the first, per request.", TOKEN_BUCKETS_S)
        self.e2e = Histogram("engine_e2e_request_latency_seconds", "Time from request arrival to its last token.",
                             LATENCY_BUCKETS_S)
        self.finished = Counter("engine_requests_finished_total", "Finished requests by finish reason.",
                                "finish_reason")
        self.rejected = Counter("engine_requests_rejected_total", "Requests refused before scheduling, by HTTP status.",
                                "status")
        self.prompt_tokens = Counter("engine_prompt_tokens_total", "Prompt tokens of finished requests.")
        self.output_tokens = Counter("engine_generation_tokens_total", "Output tokens of finished requests.")

    def observe_request(self, *, prompt_tokens: int, output_tokens: int, ttft_s: float | None, e2e_s: float,
                        finish_reason: str) -> None:
        if ttft_s is not None:
            self.ttft.observe(ttft_s)
            if output_tokens > 1:
                self.tpot.observe((e2e_s - ttft_s) / (output_tokens - 1))
        self.e2e.observe(e2e_s)
        self.finished.inc(1, finish_reason)
        self.prompt_tokens.inc(prompt_tokens)
        self.output_tokens.inc(output_tokens)

    def render(self, stats: dict) -> str:
        lines: list[str] = []
        for name, key, help_ in GAUGES:
            if key in stats:
                lines += _header(name, help_, "gauge") + [f"{name} {_fmt(stats[key])}"]
        for m in (self.ttft, self.tpot, self.e2e, self.finished, self.rejected, self.prompt_tokens, self.output_tokens):
            lines += m.render()
        return "\n".join(lines) + "\n"
