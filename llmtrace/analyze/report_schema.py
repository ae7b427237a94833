"""The report's shape (`report.json`, version REPORT_VERSION): what `build_report` writes and
what the renderers, `llmtrace diff` and the TUI read, as typed dictionaries: a key a
reader expects and the analyzer does not write is a type error, not a KeyError at a
user's terminal. JSON in, JSON out: a report read back from report.json has this type.
"""

from __future__ import annotations

from typing import Any, TypedDict

REPORT_VERSION = 1
Evidence = dict[str, Any]  # a finding's evidence: rule-specific keys (docs/architecture.md)


class Percentiles(TypedDict):
    p50: float
    p90: float
    p99: float
    mean: float
    count: int


class RequestLinks(TypedDict):
    linked: int  # requests whose TTFT comes from the steps that served them (request_steps.py)
    requests: int
    by: dict[str, int]  # link kind -> requests


class BatchSize(Percentiles):
    max: float
    timeline: list[list[float]]  # [seconds since the first request, value]


class KvUsage(TypedDict):
    peak_fraction: float
    mean_fraction: float
    peak_blocks: float
    total_blocks: float | None
    timeline: list[list[float]]


class Latencies(TypedDict):
    ttft_ms: Percentiles | None
    tpot_ms: Percentiles | None
    itl_ms: Percentiles | None
    e2e_ms: Percentiles | None


class Summary(Latencies):
    requests: int | None
    output_tokens: int
    steps: int
    duration_s: float
    throughput_tok_s: float
    queue_ms: Percentiles | None
    request_links: RequestLinks | None
    preemptions: int
    batch_size: BatchSize | None
    kv_usage: KvUsage | None


class StageFunction(TypedDict):
    name: str
    ms_per_token: float
    count: int
    sources: list[str]


class StageRow(TypedDict, total=False):
    name: str
    ms_per_step: float
    ms_per_token: float
    share: float
    count: int
    p50_ms: float
    p99_ms: float
    top_functions: list[StageFunction]  # in the report's main view only


class BreakdownView(TypedDict):
    steps: int
    tokens: int
    ms_per_step: float
    per_token_ms: float
    model_ms: float
    overhead_ms: float
    overhead_fraction: float
    stages: list[StageRow]
    headline: str


class StepsFrom(TypedDict):
    source: str  # how the steps were found (analyze/profile.py)
    idle_windows: int
    notes: list[str]


class DeviceSummary(TypedDict):
    spans: int
    timed_spans: int
    device_ms: float
    busy_ms: float
    idle_share: float
    kernels_per_span: float
    launches_per_span: float
    idle_us_per_kernel: float


class Breakdown(BreakdownView):
    decode: BreakdownView | None
    prefill: BreakdownView | None
    steps_from: StepsFrom
    device: DeviceSummary | None


class SuggestionEntry(TypedDict):
    id: str
    title: str
    stage: str
    evidence: Evidence
    est_saving_ms_per_token: float
    est_speedup: float | None
    est_saving_interval: list[float] | None
    fix: str
    impact: str | None


class ProcessEnd(TypedDict, total=False):
    pid: int
    name: str
    how: str
    at_s: float
    exit_code: int


class OffStepRow(TypedDict):
    process: str
    stage: str
    count: int
    ms: float
    mean_ms: float


class WholeRunRow(TypedDict):
    stage: str
    ms: float


class ProgramFunctionRow(TypedDict):
    function: str
    ms: float


class ProcessTracing(TypedDict):
    pid: int
    name: str
    spans: int
    instants: int
    counters: int
    dropped: int
    span_cost_ns: float
    truncated: bool
    spans_open_at_stop: int


class Tracing(TypedDict):
    spans_recorded: int
    records: int
    spans_dropped: int
    stack_samples: int
    instrumentation_cost_us_per_token: float | None
    own_threads_cpu_ms: float | None
    own_threads_cpu_share: float | None
    processes: list[ProcessTracing]


class Report(TypedDict):
    version: int
    summary: Summary
    process_ends: list[ProcessEnd]
    breakdown: Breakdown | None  # None: no step loop found (then whole_run says where time went)
    whole_run: list[WholeRunRow] | None
    whole_run_functions: list[ProgramFunctionRow] | None
    off_steps: list[OffStepRow]
    suggestions: list[SuggestionEntry]
    rule_errors: list[str]
    tracing: Tracing
    meta: dict[str, Any]
