"""Function-level detail from viztracer, with a bounded cost: the tracer runs only inside
the spans of the chosen stages, during their first N steps; everywhere else the program
runs untraced.

How: `install` puts a window in front of the span factories (`llmtrace.span`,
`recorder.span`, `recorder.traced`, which the `@llmtrace.trace` decorator uses). A span of
a chosen stage starts the process's VizTracer after the span starts and stops it before
the span ends, so every function event lies inside its stage span; spans of other stages
get the unwrapped recorder objects, and a process without a window runs the recorder
untouched (the C backend pays nothing).

Clock: viztracer 1.x stamps events with the TSC calibrated against CLOCK_MONOTONIC
(`quicktime.c`: t0_ns + (tsc - t0_tsc) * factor), in µs, so `ts * 1000` is on llmtrace's
clock (perf_counter_ns, CLOCK_MONOTONIC) as it is; its `baseTimeNanoseconds` is the
CLOCK_REALTIME - CLOCK_MONOTONIC offset, like our spool header's `epoch_offset_ns`.
The tracer stops for good when the window has its N steps (at the next span of a chosen
stage); its events are saved to RUN/viztracer/<pid>.json when the process stops recording
(exit, SIGTERM/SIGHUP, a multiprocessing child's target returning: sink.on_final_stop),
not then, so no step pays for the save. A forked child starts a window of its own.
"""

from __future__ import annotations

import itertools
import os
import re
from dataclasses import dataclass

from ..errors import UserError

ENV = "LLMTRACE_VIZTRACER"  # "preprocess,sampling:20"
DIR = "viztracer"
TRACER_ENTRIES = 300_000  # viztracer preallocates its ring buffer: ~30 MB
SOURCE = "viztracer"
_NAME = re.compile(r"^(?P<qual>.+) \((?P<file>.+):(?P<line>\d+)\)$")


@dataclass(frozen=True)
class WindowSpec:
    stages: tuple[str, ...]
    steps: int

    @classmethod
    def parse(cls, stages, steps: int) -> WindowSpec:
        """From a comma-separated string or a list of stages, and a step count."""
        names = stages.split(",") if isinstance(stages, str) else list(stages or ())
        names = tuple(s.strip() for s in names if s and s.strip())
        if not names:
            raise UserError("viztracer: name at least one stage to trace inside (e.g. preprocess)")
        if not isinstance(steps, int) or steps < 1:
            raise UserError(f"viztracer: steps must be a positive integer, got {steps!r}")
        return cls(names, steps)

    def to_env(self) -> str:
        return f"{','.join(self.stages)}:{self.steps}"

    @classmethod
    def from_env(cls, value: str) -> WindowSpec:
        stages, _, steps = value.rpartition(":")
        try:
            return cls.parse(stages, int(steps))
        except ValueError:
            raise UserError(f"{ENV}={value!r}: expected STAGE[,STAGE...]:STEPS") from None


def _stage_of(name: str) -> str:
    dot = name.find(".")
    return name if dot < 0 else name[:dot]


class Window:
    """One process's viztracer window over the chosen stages' first `steps` steps. VizTracer
    traces the thread that started it: when chosen spans overlap on several threads, the
    first one's thread is traced until the last one ends."""

    def __init__(self, spec: WindowSpec, out_dir: str, span_factory, traced_factory):
        self.stages = frozenset(spec.stages)
        self.steps = spec.steps
        self.out_dir = out_dir
        self.closed = False
        self._span, self._traced = span_factory, traced_factory
        self._seen: set = set()
        self._anonymous = itertools.count()
        self._depth = 0
        self._tracer = None

    # -- the factories the window stands in for --------------------------------------
    def span(self, name, *, stage=None, step=-1, follows=None, device=False, **attrs):
        inner = self._span(name, stage=stage, step=step, follows=follows, device=device, **attrs)
        if self.closed or (stage if stage is not None else _stage_of(name)) not in self.stages:
            return inner
        return _WindowedSpan(inner, self)

    def traced(self, fn, name, stage):
        inner = self._traced(fn, name, stage)
        if stage not in self.stages:
            return inner
        window = self

        def traced_in_window(*args, **kwargs):
            if window.closed:
                return inner(*args, **kwargs)
            started = window.enter()
            try:
                return inner(*args, **kwargs)
            finally:
                if started:
                    window.exit()

        return traced_in_window

    # -- window bookkeeping ------------------------------------------------------------
    def enter(self) -> bool:
        """At the start of a chosen stage's span: start tracing unless the window is full."""
        if self._depth == 0:
            from .. import recorder

            step = recorder.current()[1]
            key = step if step >= 0 else ("call", next(self._anonymous))
            if key not in self._seen:
                if len(self._seen) >= self.steps:
                    self.close()
                    return False
                self._seen.add(key)
            self._tracer_obj().start()
        self._depth += 1
        return True

    def exit(self) -> None:
        self._depth -= 1
        if self._depth == 0 and self._tracer is not None:  # None: saved at exit inside the span
            self._tracer.stop()

    def _tracer_obj(self):
        if self._tracer is None:
            from viztracer import VizTracer

            self._tracer = VizTracer(tracer_entries=TRACER_ENTRIES, verbose=0, register_global=False, file_info=False)
        return self._tracer

    def close(self) -> None:
        """Stop tracing for good (cheap: the events stay in viztracer's buffer)."""
        self.closed = True
        if self._tracer is not None:
            self._tracer.stop()

    def save(self) -> None:
        """Write the events to RUN/viztracer/<pid>.json (at exit)."""
        self.close()
        if self._tracer is None:
            return
        self._tracer.parse()
        data = self._tracer.data
        data.setdefault("viztracer_metadata", {})["baseTimeNanoseconds"] = self._tracer.get_base_time()
        data["llmtrace"] = {
            "clock": "CLOCK_MONOTONIC",
            "stages": sorted(self.stages),
            "steps": [k for k in self._seen if isinstance(k, int)],
        }
        self._tracer = None
        _write_json(data, os.path.join(self.out_dir, DIR, f"{os.getpid()}.json"))

    def after_fork_in_child(self) -> None:
        """A forked child gets its own window (and file); the parent's events stay there."""
        if self._tracer is not None and self._depth:
            self._tracer.stop()
        self._tracer, self._depth, self.closed = None, 0, False
        self._seen.clear()


class _WindowedSpan:
    """A chosen stage's span: the recorder's span, with the tracer running inside it."""

    __slots__ = ("inner", "window", "started")

    def __init__(self, inner, window: Window):
        self.inner, self.window, self.started = inner, window, False

    def __enter__(self):
        r = self.inner.__enter__()
        self.started = not self.window.closed and self.window.enter()
        return r

    def __exit__(self, et, ev, tb):
        if self.started:
            self.window.exit()
        return self.inner.__exit__(et, ev, tb)

    def set(self, **attrs):
        return self.inner.set(**attrs)


_window: Window | None = None


def install(spec: WindowSpec, out_dir: str) -> Window:
    """Put a viztracer window in front of this process's span factories."""
    global _window
    import llmtrace

    from .. import recorder, sink

    if _window is not None:
        return _window
    import viztracer  # noqa: F401  (imported now, not inside the first traced span)

    _window = Window(spec, out_dir, recorder.span, recorder.traced)
    llmtrace.span = recorder.span = _window.span
    recorder.traced = _window.traced
    sink.on_final_stop(_window.save)  # at exit, a stop signal, a multiprocessing child's end
    os.register_at_fork(after_in_child=_window.after_fork_in_child)
    return _window


def install_from_env() -> Window | None:
    from .. import ENV_OUT

    value, out = os.environ.get(ENV), os.environ.get(ENV_OUT)
    if not value or not out:
        return None
    return install(WindowSpec.from_env(value), out)


def event_name(name: str) -> str:
    """viztracer's 'Logger.debug (/usr/lib/python3.11/logging/__init__.py:1467)' ->
    'logging.Logger.debug'; C functions ('numpy.empty', 'builtins.len') stay as they are."""
    from . import function_name

    m = _NAME.match(name)
    return function_name(m["qual"], m["file"]) if m else name


def to_foreign(events: list[dict], shift_us: float = 0.0) -> list[dict]:
    """viztracer's complete and instant events, renamed for the analyzer, shifted by
    `shift_us` (0 when they are on CLOCK_MONOTONIC already)."""
    out = []
    for e in events:
        if e.get("ph") not in ("X", "i") or "ts" not in e:
            continue
        ev = {
            "name": event_name(str(e.get("name", "?"))),
            "cat": SOURCE,
            "ph": e["ph"],
            "pid": e.get("pid", 0),
            "tid": e.get("tid", 0),
            "ts": float(e["ts"]) + shift_us,
        }
        if e["ph"] == "X":
            ev["dur"] = float(e.get("dur", 0.0))
        else:
            ev["s"] = e.get("s", "t")
        out.append(ev)
    return out


def load_run(run_dir: str) -> tuple[list[dict], dict]:
    """Every process's viztracer window of a run: (foreign events on the trace's clock,
    {pid: {"stages", "steps"}} - the steps whose chosen stages ran traced, hence slower)."""
    from ..export.load_chrome import read_json

    events, windows = [], {}
    for path in run_files(run_dir):
        data = read_json(path)
        events.extend(to_foreign(data.get("traceEvents", [])))
        windows[os.path.basename(path)[: -len(".json")]] = data.get("llmtrace", {})
    return events, windows


def run_files(run_dir: str) -> list[str]:
    """The viztracer files of a run, one per process."""
    d = os.path.join(run_dir, DIR)
    if not os.path.isdir(d):
        return []
    return [os.path.join(d, name) for name in sorted(os.listdir(d)) if name.endswith(".json")]


def _write_json(data: dict, path: str) -> None:
    import orjson

    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(orjson.dumps(data, default=str))
    os.replace(tmp, path)
