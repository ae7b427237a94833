"""The server's Prometheus metrics, named as vLLM names them, rendered as text.

Exposition format 0.0.4 (what `GET /metrics` serves). Every series carries the
`model_name` label and the names take a configurable prefix (`engine.metrics_prefix`,
vLLM's `vllm:` by default), so dashboards and scrapers written for vLLM read them:
gauges (`num_requests_running`, `num_requests_waiting`, `kv_cache_usage_perc`) read from
the master at scrape time; counters (`num_preemptions_total`, `prompt_tokens_total`,
`generation_tokens_total`, `request_success_total` by `finished_reason`); and per-request
histograms observed when a request finishes (`time_to_first_token_seconds`,
`inter_token_latency_seconds`, `request_time_per_output_token_seconds`,
`e2e_request_latency_seconds`, `request_queue_time_seconds`,
`request_inference_time_seconds`, `request_prefill_time_seconds`,
`request_decode_time_seconds`, `request_prompt_tokens`, `request_generation_tokens`).
`requests_rejected_total` (by HTTP status) is this server's own. Single event loop, so
no locks.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DEFAULT_PREFIX = "vllm:"

LATENCY_BUCKETS_S = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)
TOKEN_GAP_BUCKETS_S = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
LENGTH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)


def _fmt(v: float) -> str:
    if isinstance(v, int):
        return str(v)
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


def _label(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(pairs: dict) -> str:
    return "{" + ",".join(f'{k}="{_label(str(v))}"' for k, v in pairs.items()) + "}"


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

    def render(self, labels: dict) -> list[str]:
        lines = _header(self.name, self.help, "histogram")
        running = 0
        for bound, c in zip((*self.bounds, math.inf), self.counts):
            running += c
            lines.append(f"{self.name}_bucket{_labels({**labels, 'le': _fmt(bound)})} {running}")
        lines += [
            f"{self.name}_sum{_labels(labels)} {_fmt(self.sum)}",
            f"{self.name}_count{_labels(labels)} {self.count}",
        ]
        return lines


class Counter:
    """Monotonic counter, optionally split by one label."""

    def __init__(self, name: str, help_: str, label: str | None = None):
        self.name, self.help, self.label = name, help_, label
        self.values: dict[str, float] = {}

    def inc(self, n: float = 1, label_value: str = "") -> None:
        self.values[label_value] = self.values.get(label_value, 0) + n

    def render(self, labels: dict) -> list[str]:
        lines = _header(self.name, self.help, "counter")
        if self.label is None:
            return lines + [f"{self.name}{_labels(labels)} {_fmt(self.values.get('', 0))}"]
        return lines + [
            f"{self.name}{_labels({**labels, self.label: k})} {_fmt(v)}" for k, v in sorted(self.values.items())
        ]


@dataclass
class RequestTimes:
    """One finished request, in seconds (None where it never got that far)."""

    prompt_tokens: int
    output_tokens: int
    e2e_s: float
    finish_reason: str
    ttft_s: float | None = None
    queue_s: float | None = None  # arrival at the scheduler -> first scheduled
    prefill_s: float | None = None  # first scheduled -> first token
    decode_s: float | None = None  # first token -> last token
    token_gaps_s: tuple[float, ...] = ()  # between successive output tokens


# key -> (vLLM's name without the prefix, help, buckets)
HISTOGRAMS = {
    "ttft": ("time_to_first_token_seconds", "Histogram of time to first token in seconds.", LATENCY_BUCKETS_S),
    "itl": ("inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", TOKEN_GAP_BUCKETS_S),
    "tpot": (
        "request_time_per_output_token_seconds",
        "Histogram of time per output token of each request in seconds.",
        TOKEN_GAP_BUCKETS_S,
    ),
    "e2e": ("e2e_request_latency_seconds", "Histogram of end to end request latency in seconds.", LATENCY_BUCKETS_S),
    "queue": ("request_queue_time_seconds", "Histogram of time spent in WAITING phase for request.", LATENCY_BUCKETS_S),
    "inference": (
        "request_inference_time_seconds",
        "Histogram of time spent in RUNNING phase for request.",
        LATENCY_BUCKETS_S,
    ),
    "prefill": (
        "request_prefill_time_seconds",
        "Histogram of time spent in PREFILL phase for request.",
        LATENCY_BUCKETS_S,
    ),
    "decode": (
        "request_decode_time_seconds",
        "Histogram of time spent in DECODE phase for request.",
        LATENCY_BUCKETS_S,
    ),
    "prompt_len": ("request_prompt_tokens", "Number of prefill tokens processed.", LENGTH_BUCKETS),
    "generation_len": ("request_generation_tokens", "Number of generation tokens processed.", LENGTH_BUCKETS),
}


class EngineMetrics:
    """Everything `GET /metrics` shows; the server calls `observe_request` once per request."""

    def __init__(self, model_name: str, prefix: str = DEFAULT_PREFIX):
        self.labels = {"model_name": model_name}
        self.prefix = p = prefix
        self.histograms = {
            attr: Histogram(p + name, help_, buckets) for attr, (name, help_, buckets) in HISTOGRAMS.items()
        }
        self.success = Counter(
            p + "request_success_total", "Count of successfully processed requests.", "finished_reason"
        )
        self.prompt_tokens = Counter(p + "prompt_tokens_total", "Number of prefill tokens processed.")
        self.generation_tokens = Counter(p + "generation_tokens_total", "Number of generation tokens processed.")
        self.rejected = Counter(
            p + "requests_rejected_total", "Requests refused before scheduling, by HTTP status.", "status"
        )

    def observe_request(self, t: RequestTimes) -> None:
        h = self.histograms
        if t.ttft_s is not None:
            h["ttft"].observe(t.ttft_s)
            if t.output_tokens > 1:
                h["tpot"].observe((t.e2e_s - t.ttft_s) / (t.output_tokens - 1))
        for gap in t.token_gaps_s:
            h["itl"].observe(gap)
        h["e2e"].observe(t.e2e_s)
        for key, v in (("queue", t.queue_s), ("prefill", t.prefill_s), ("decode", t.decode_s)):
            if v is not None:
                h[key].observe(v)
        if t.prefill_s is not None:
            h["inference"].observe(t.prefill_s + (t.decode_s or 0.0))
        h["prompt_len"].observe(t.prompt_tokens)
        h["generation_len"].observe(t.output_tokens)
        self.success.inc(1, t.finish_reason)
        self.prompt_tokens.inc(t.prompt_tokens)
        self.generation_tokens.inc(t.output_tokens)

    def _gauges(self, stats: dict) -> list[tuple[str, str, str, float]]:
        p, total = self.prefix, stats.get("kv_blocks_total") or 0
        return [
            (
                p + "num_requests_running",
                "Number of requests in model execution batches.",
                "gauge",
                stats.get("running", 0),
            ),
            (
                p + "num_requests_waiting",
                "Number of requests waiting to be processed.",
                "gauge",
                stats.get("waiting", 0),
            ),
            (
                p + "kv_cache_usage_perc",
                "KV-cache usage. 1 means 100 percent usage.",
                "gauge",
                stats.get("kv_blocks_used", 0) / total if total else 0.0,
            ),
            (
                p + "num_preemptions_total",
                "Cumulative number of preemption from the engine.",
                "counter",
                stats.get("preemptions", 0),
            ),
        ]

    def render(self, stats: dict) -> str:
        lines: list[str] = []
        for name, help_, kind, value in self._gauges(stats):
            lines += _header(name, help_, kind) + [f"{name}{_labels(self.labels)} {_fmt(value)}"]
        for m in (*self.histograms.values(), self.success, self.prompt_tokens, self.generation_tokens, self.rejected):
            lines += m.render(self.labels)
        return "\n".join(lines) + "\n"
