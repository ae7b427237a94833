"""llmtrace: tracing and overhead analysis for LLM serving pipelines.

    with llmtrace.span("preprocess", step=12, batch=8): ...
    @llmtrace.trace / @llmtrace.trace("tokenize") / @llmtrace.trace(stage="sampling")
    llmtrace.counter("kv_blocks_used", 123)
    llmtrace.instant("preempt", req="r7")
    llmtrace.configure(enabled=True, out="runs/x", process_name="agent-0", resource={"max_num_seqs": 64})
    with llmtrace.span("agent.step", start_ns=t0) as s: s.follow(carrier)   # late link, explicit start
    llmtrace.record_span("queue", arrival_ns, scheduled_ns, req="r7")       # times known afterwards
    for batch in llmtrace.steps(loader): ...     # or `with llmtrace.step(tokens=n):` marks the loop
    llmtrace.instrument()                        # sockets, pipes, logging, sleep, torch, tokenizers, HTTP

Importing llmtrace imports neither torch, numpy nor textual. A process started with
LLMTRACE_OUT set (by `llmtrace run/record` or by a parent that called configure) starts
recording at import.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable

from . import context, recorder, sink
from .decorator import trace
from .recorder import counter, instant, span
from .steps import step, steps
from .timed import record_span

__all__ = [
    "span",
    "trace",
    "counter",
    "instant",
    "record_span",
    "step",
    "steps",
    "instrument",
    "uninstrument",
    "configure",
    "enabled",
    "flush",
    "context",
    "shutdown",
]
__version__ = "0.1.0"

ENV_OUT = "LLMTRACE_OUT"
ENV_ENABLED = "LLMTRACE_ENABLED"
ENV_TRACE_ID = "LLMTRACE_TRACE_ID"
ENV_PROCESS_NAME = "LLMTRACE_PROCESS_NAME"
ENV_SAMPLE_HZ = "LLMTRACE_SAMPLE_HZ"
ENV_GC = "LLMTRACE_GC"
ENV_AUTO = "LLMTRACE_AUTO"  # "1": automatic instrumentation in every recorded process


def instrument(groups: Iterable[str] | None = None) -> list[str]:
    """Spans at the boundaries every serving stack has (llmtrace/auto/); returns
    the groups newly patched. `llmtrace record` does this unless --no-auto."""
    from .auto import instrument as _instrument

    return _instrument(groups)


def uninstrument() -> None:
    from .auto import uninstrument as _uninstrument

    _uninstrument()


def _default_process_name() -> str:
    argv0 = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"
    return f"{argv0}-{os.getpid()}"


def configure(
    enabled: bool = True,
    out: str | None = None,
    process_name: str | None = None,
    sample_hz: float | None = None,
    gc: bool | None = None,
    propagate: bool = True,
    resource: dict[str, object] | None = None,
) -> None:
    """Turn recording on or off and choose where records go.

    out: run directory; records spool to OUT/spool/<pid>.lts. Without it, records stay
    in memory until `recorder.drain()` (useful in tests).
    process_name: how exports name this process; naming an already spooling process
    (e.g. one that started recording from the environment) renames it, losing nothing.
    sample_hz: also sample every thread's stack this often (function names per stage).
    gc: record garbage-collector pauses as `gc` spans.
    sample_hz and gc left as None keep what the environment says (a parent's settings).
    propagate: export the settings in the environment so child processes record too.
    resource: attributes of the whole process (limits, model name), kept with its trace
    once instead of as a counter per step.
    """
    if resource:
        sink.set_resource(resource)
    running = sink.current()
    if out is not None:
        out = os.path.abspath(out)
    if out is not None and (running is None or running.out_dir != out):
        sink.start(out, process_name or _default_process_name(), context.trace_id)
    elif process_name is not None and running is not None:
        running.rename(process_name)
    recorder.set_enabled(enabled)
    if sample_hz is None:
        sample_hz = float(os.environ.get(ENV_SAMPLE_HZ) or 0)
    if gc is None:
        gc = os.environ.get(ENV_GC) == "1"
    if sample_hz > 0:
        from . import stack_sampler

        stack_sampler.start(1.0 / sample_hz)
    if gc:
        from . import gc_spans

        gc_spans.install()
    if propagate and out is not None:
        os.environ[ENV_OUT] = out
        os.environ[ENV_TRACE_ID] = f"{context.trace_id:x}"
        os.environ[ENV_ENABLED] = "1" if enabled else "0"
        os.environ[ENV_SAMPLE_HZ] = str(sample_hz)
        os.environ[ENV_GC] = "1" if gc else "0"


def enabled() -> bool:
    return recorder.is_enabled()


def flush() -> int:
    """Write what has been recorded so far to the spool; returns the number of records."""
    return int(sink.flush())


def shutdown() -> None:
    """Flush and close the spool file; recording stops."""
    if "llmtrace.stack_sampler" in sys.modules:
        sys.modules["llmtrace.stack_sampler"].stop()
    recorder.set_enabled(False)
    sink.stop()


def _configure_from_env() -> None:
    out = os.environ.get(ENV_OUT)
    if out and os.environ.get(ENV_ENABLED, "1") != "0":
        configure(True, out, os.environ.get(ENV_PROCESS_NAME) or None, propagate=False)
        if os.environ.get(ENV_AUTO) == "1":
            instrument()
        if os.environ.get("LLMTRACE_VIZTRACER"):  # viztracer inside chosen stages (integrations/viztracer.py)
            from .integrations import viztracer

            viztracer.install_from_env()
        if os.environ.get("LLMTRACE_PYSPY"):  # py-spy samples this process tree (integrations/pyspy.py)
            from .integrations import pyspy

            pyspy.child_start()


_configure_from_env()
