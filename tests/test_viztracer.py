"""viztracer inside chosen stages for N steps: the window's bookkeeping, and a recorded
pipeline whose report names the slow function under its stage from viztracer's events,
which lie inside that stage's spans on the same thread."""

from __future__ import annotations

import json
import os
import sys
import textwrap

import pytest
from test_record import PIPELINE, names_array_formatting_in_preprocess, record, report, stage_functions

from llmtrace import recorder
from llmtrace.errors import UserError
from llmtrace.integrations.viztracer import Window, WindowSpec, event_name, to_foreign


@pytest.fixture
def recording():
    was = recorder.is_enabled()
    recorder.set_enabled(True)
    recorder.drain()
    yield
    recorder.set_enabled(was)
    recorder.drain()


def busy_function():
    return sum(range(2000))


def test_window_traces_chosen_stages_for_n_steps(tmp_path, recording):
    window = Window(WindowSpec.parse("preprocess", 2), str(tmp_path), recorder.span, recorder.traced)
    traced_pre = window.traced(busy_function, "preprocess.pad", "preprocess")
    assert window.traced(busy_function, "forward", "forward") is not traced_pre
    for step in range(4):
        with recorder.span("pipeline.step", step=step):
            with window.span("preprocess") as sp:
                sp.set(batch=4)
                with window.span("preprocess.inner"):  # nested: one window entry
                    busy_function()
                traced_pre()
            with window.span("forward"):  # not chosen: untraced
                busy_function()
    assert window.closed
    window.save()
    with open(tmp_path / "viztracer" / f"{os.getpid()}.json") as f:
        data = json.load(f)
    assert sorted(data["llmtrace"]["steps"]) == [0, 1] and data["llmtrace"]["stages"] == ["preprocess"]
    calls = [e for e in data["traceEvents"] if e.get("ph") == "X" and "busy_function" in e["name"]]
    assert len(calls) == 2 * 2  # steps 0 and 1, nested span + traced function; nothing from forward
    assert data["viztracer_metadata"]["baseTimeNanoseconds"] > 0


def test_spans_outside_a_window_are_the_recorders_own(recording, tmp_path):
    window = Window(WindowSpec.parse(["sampling"], 1), str(tmp_path), recorder.span, recorder.traced)
    assert type(window.span("preprocess")) is type(recorder.span("preprocess"))
    assert window.traced(busy_function, "f", "user") is not None


def test_spec_errors():
    with pytest.raises(UserError, match="at least one stage"):
        WindowSpec.parse(" , ", 3)
    with pytest.raises(UserError, match="positive"):
        WindowSpec.parse("preprocess", 0)
    with pytest.raises(UserError, match="STAGE"):
        WindowSpec.from_env("preprocess:x")
    assert WindowSpec.from_env(WindowSpec.parse("a,b", 5).to_env()) == WindowSpec(("a", "b"), 5)


def test_event_names_for_the_analyzer():
    logging_file = os.path.join(os.path.dirname(os.__file__), "logging", "__init__.py")
    assert event_name(f"Logger.debug ({logging_file}:1467)") == "logging.Logger.debug"
    assert event_name("numpy.empty") == "numpy.empty"
    ev = to_foreign(
        [
            {"ph": "M", "name": "thread_name"},
            {"ph": "X", "name": "builtins.len", "pid": 1, "tid": 2, "ts": 10.0, "dur": 1.5},
        ]
    )
    assert ev == [{"name": "builtins.len", "cat": "viztracer", "ph": "X", "pid": 1, "tid": 2, "ts": 10.0, "dur": 1.5}]


def test_record_with_viztracer_names_the_slow_function(tmp_path):
    steps = 3
    r = record(
        tmp_path,
        "--sample-hz",
        "0",
        "--viztracer",
        "--viztracer-stages",
        "preprocess",
        "--viztracer-steps",
        str(steps),
        program=[sys.executable, PIPELINE, "--steps", "10"],
    )
    assert r.returncode == 0, r.stderr
    rep = report(tmp_path)
    names_array_formatting_in_preprocess(rep, "viztracer")

    from llmtrace.load import load_trace

    trace = load_trace(str(tmp_path))  # a recorded run dir: spools + viztracer/
    windows = trace.meta["viztracer"]
    (window,) = windows.values()
    assert sorted(window["steps"]) == list(range(steps))
    pre = [s for s in trace.spans if s.stage == "preprocess" and s.name == "preprocess"]
    inside = {s.step: s for s in pre}
    for e in trace.foreign_events:
        start, end = e["ts"] * 1000, (e["ts"] + e.get("dur", 0)) * 1000
        owner = [
            s
            for s in inside.values()
            if s.pid == e["pid"] and s.tid == e["tid"] and s.start_ns <= start and end <= s.end_ns + 1000
        ]
        assert owner and owner[0].step < steps, e


def test_a_forked_multiprocessing_worker_saves_its_own_window(tmp_path):
    """A fork-started worker ends with os._exit (no atexit): its window is saved when its
    target returns, and the analyzer names the function inside its stage."""
    prog = tmp_path / "forked.py"
    prog.write_text(
        textwrap.dedent("""
        import multiprocessing as mp
        import llmtrace

        def render(rows):
            return [str(r) for r in rows]

        def worker(n):
            rows = [list(range(i, i + 200)) for i in range(40)]
            for _ in range(n):
                with llmtrace.step(tokens=1):
                    with llmtrace.span("preprocess"):
                        render(rows)
                    with llmtrace.span("forward"):
                        sum(range(20000))

        if __name__ == "__main__":
            mp.set_start_method("fork")
            p = mp.Process(target=worker, args=(12,), name="fork-worker")
            p.start()
            p.join()
    """)
    )
    out = tmp_path / "run"
    r = record(
        out,
        "--sample-hz",
        "0",
        "--viztracer",
        "--viztracer-stages",
        "preprocess",
        "--viztracer-steps",
        "5",
        program=[sys.executable, str(prog)],
    )
    assert r.returncode == 0, r.stderr
    from llmtrace.load import load_trace

    trace = load_trace(str(out))
    worker = next(pid for pid, p in trace.processes.items() if p.name == "fork-worker")
    assert os.path.isfile(out / "viztracer" / f"{worker}.json")
    tops = stage_functions(report(out), "preprocess")
    assert any("render" in f["name"] and "viztracer" in f["sources"] for f in tops), tops
