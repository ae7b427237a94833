"""`llmtrace record`: any program recorded from interpreter start, its stages found by span
name, the slow function inside a stage named by the in-process sampler; the program's exit
code comes back and the trace is written however it ended."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIPELINE = os.path.join(ROOT, "examples", "custom_pipeline.py")
ARRAY_FORMATTING = ("array2string", "_array_str", "_array_repr", "arrayprint")


def record(out, *options, program, timeout=120, env_extra=None, **kw):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMTRACE_")} | (env_extra or {})
    cmd = [sys.executable, "-m", "llmtrace.cli", "record", "--out", str(out), *options, "--", *program]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT, **kw)


def report(out) -> dict:
    with open(os.path.join(out, "report.json")) as f:
        return json.load(f)


def stage_functions(rep: dict, stage: str) -> list[dict]:
    return next(r for r in rep["breakdown"]["stages"] if r["name"] == stage)["top_functions"]


def names_array_formatting_in_preprocess(rep: dict, source: str, in_top_functions: bool = True) -> None:
    """The slow function (numpy formatting an array for a debug log) is named under
    preprocess, by `source`, in a log-in-hot-path suggestion and (in_top_functions) in the
    stage's top functions."""
    found = [
        s
        for s in rep["suggestions"]
        if s["stage"] == "preprocess"
        and any(any(k in f["name"] for k in ARRAY_FORMATTING) for f in s["evidence"].get("functions", []))
    ]
    assert found and found[0]["id"] == "log-in-hot-path", rep["suggestions"]
    named = [f for f in found[0]["evidence"]["functions"] if any(k in f["name"] for k in ARRAY_FORMATTING)]
    assert any(source in s for f in named for s in f["sources"]), named
    if in_top_functions:
        tops = stage_functions(rep, "preprocess")
        hits = [f for f in tops if any(k in f["name"] for k in ARRAY_FORMATTING)]
        assert hits and any(source in s for f in hits for s in f["sources"]), tops


def script(tmp_path, body: str) -> str:
    path = tmp_path / "prog.py"
    path.write_text(textwrap.dedent(body))
    return str(path)


def test_builtin_sampler_names_the_slow_function_in_its_stage(tmp_path):
    r = record(tmp_path, "--sample-hz", "1000", program=[sys.executable, PIPELINE, "--steps", "150"])
    assert r.returncode == 0, r.stderr
    rep = report(tmp_path)
    stages = {row["name"] for row in rep["breakdown"]["stages"]}
    assert {"preprocess", "tokenize", "detokenize"} <= stages  # generic path: the root's children by name
    assert rep["summary"]["output_tokens"] == 150 * 8  # `batch` attr of the step root
    names_array_formatting_in_preprocess(rep, "samples:llmtrace")
    assert "log-in-hot-path" in r.stdout and os.path.isfile(tmp_path / "trace.json")
    # what the sampler and the flusher cost, measured in-band (their threads' CPU time)
    assert 0 < rep["tracing"]["own_threads_cpu_share"] < 0.5 and rep["tracing"]["own_threads_cpu_ms"] > 0
    assert "llmtrace's own threads" in r.stdout


PROGRAM_THAT_RAISES = """
    import llmtrace, time
    for i in range(3):
        with llmtrace.span("pipeline.step", step=i):
            with llmtrace.span("preprocess"):
                time.sleep(0.002)
    raise RuntimeError("boom")
"""


def test_program_that_raises_exit_code_and_trace(tmp_path):
    r = record(tmp_path / "run", "--sample-hz", "0", program=[sys.executable, script(tmp_path, PROGRAM_THAT_RAISES)])
    assert r.returncode == 1
    assert "RuntimeError: boom" in r.stderr and "the program exited with code 1" in r.stderr
    rep = report(tmp_path / "run")
    assert rep["failure"] == "the program exited with code 1"
    assert rep["breakdown"]["steps"] == 3
    assert os.path.isfile(tmp_path / "run" / "trace.json")


def test_exit_code_passed_through(tmp_path):
    r = record(
        tmp_path / "run",
        "--sample-hz",
        "0",
        program=[sys.executable, "-c", "import sys, llmtrace\nwith llmtrace.span('x', step=0): pass\nsys.exit(3)"],
    )
    assert r.returncode == 3, r.stderr


SPAWNS_A_PLAIN_CHILD = """
    import subprocess, sys, time, llmtrace
    with llmtrace.span("pipeline.step", step=0):
        with llmtrace.span("preprocess"):
            subprocess.run([sys.executable, "-c", "import time; time.sleep(0.1)"], check=True)
    print("spans done", flush=True)
    time.sleep(30)
"""


def test_sigterm_forwarded_children_recorded_trace_written(tmp_path):
    """SIGTERM to `record` reaches the program; its child, which never imports llmtrace,
    has its own spool file (with samples); the trace is written; exit code 128 + 15."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMTRACE_")}
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "llmtrace.cli",
        "record",
        "--out",
        str(out),
        "--sample-hz",
        "200",
        "--",
        sys.executable,
        script(tmp_path, SPAWNS_A_PLAIN_CHILD),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    assert proc.stdout.readline().strip() == "spans done"
    time.sleep(0.2)  # a spool flush (50 ms) for the spans
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "killed by SIGTERM" in stderr
    spools = os.listdir(out / "spool")
    assert len(spools) == 2, spools
    rep = report(out)
    assert rep["breakdown"]["steps"] == 1 and rep["failure"] == "the program was killed by SIGTERM"


def test_no_program_is_a_clear_error(tmp_path):
    r = record(tmp_path, program=[])
    assert r.returncode == 2 and "give the program to record" in r.stderr
    r = record(tmp_path, program=["/nonexistent/prog"])
    assert r.returncode == 2 and "cannot start '/nonexistent/prog'" in r.stderr
    (tmp_path / "spool").mkdir()
    (tmp_path / "spool" / "1.lts").write_bytes(b"")
    r = record(tmp_path, program=[sys.executable, "-c", "pass"])
    assert r.returncode == 2 and "already holds a recording" in r.stderr


@pytest.mark.parametrize(
    "rc,expected",
    [(0, (0, None)), (3, (3, "the program exited with code 3")), (-9, (137, "the program was killed by SIGKILL"))],
)
def test_exit_status(rc, expected):
    from llmtrace.commands.record import exit_status

    assert exit_status(rc) == expected


FORKING = """
import multiprocessing as mp, time

def busy(n):
    t = time.perf_counter()
    while time.perf_counter() - t < 0.3:
        sum(range(1000))

if __name__ == "__main__":
    p = mp.Process(target=busy, args=(1,), name="model-worker-7")
    p.start()
    p.join()
"""


def test_a_forked_child_keeps_sampling_under_its_multiprocessing_name(tmp_path):
    from llmtrace.load import load_trace

    r = record(tmp_path / "run", "--sample-hz", "200", program=[sys.executable, script(tmp_path, FORKING)])
    assert r.returncode == 0, r.stderr
    trace = load_trace(str(tmp_path / "run"))
    (child,) = [p for p in trace.processes.values() if p.name == "model-worker-7"]
    busy = [s for s in trace.samples if s.pid == child.pid and any(":busy" in f for f in s.stack)]
    assert len(busy) >= 10  # 0.3 s at 200/s, sampled in the child by its own sampler


HANGS_UP = """
import time, llmtrace
with llmtrace.span("before.hangup"):
    pass
print("ready", flush=True)
time.sleep(30)
"""


def test_sighup_keeps_the_trace_like_sigterm(tmp_path):
    from llmtrace.load import load_trace

    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMTRACE_")}
    out = tmp_path / "run"
    # SIGHUP as a terminal leaves it (a suite run under nohup ignores it, and an ignored
    # signal stays ignored in the program, as it should)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llmtrace.cli",
            "record",
            "--out",
            str(out),
            "--",
            sys.executable,
            script(tmp_path, HANGS_UP),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL),
    )
    assert proc.stdout.readline().strip() == "ready"
    (child,) = [int(p) for p in os.listdir("/proc") if p.isdigit() and _ppid(p) == proc.pid]
    os.kill(child, signal.SIGHUP)
    assert proc.wait(timeout=30) == 128 + signal.SIGHUP
    trace = load_trace(str(out))
    assert "before.hangup" in {s.name for s in trace.spans}
    (prog,) = [p for p in trace.processes.values() if p.pid == child]
    assert prog.truncated_at is None  # the spool was closed, not cut off by the signal


def _ppid(pid: str) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().split(") ", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


NO_LOOP = """
import json, time

def encode_forever():
    t = time.perf_counter()
    while time.perf_counter() - t < 0.6:
        json.dumps({"k": list(range(200))})
        sum(i * i for i in range(2000))

encode_forever()
"""


def test_without_a_step_loop_the_report_says_where_the_time_went(tmp_path):
    r = record(tmp_path / "run", "--sample-hz", "250", program=[sys.executable, script(tmp_path, NO_LOOP)])
    assert r.returncode == 0, r.stderr
    rep = report(tmp_path / "run")
    assert rep["breakdown"] is None
    assert {row["stage"] for row in rep["whole_run"]} >= {"serialize"}  # the automatic json spans
    busy = [row["function"] for row in rep["whole_run_functions"]]
    assert busy and busy[0].startswith("__main__.encode_forever"), busy
    assert (
        "No step loop found" in r.stdout + r.stderr
        or "No step loop found" in open(os.path.join(tmp_path / "run", "report.md")).read()
    )


def test_an_analyzer_failure_keeps_the_trace_and_says_so(tmp_path, monkeypatch, capsys):
    from llmtrace import outputs
    from llmtrace.analyze import report as report_mod
    from llmtrace.load import load_trace

    r = record(tmp_path, program=[sys.executable, "-c", "import llmtrace\nwith llmtrace.span('x', step=0): pass"])
    assert r.returncode == 0, r.stderr
    os.remove(tmp_path / "trace.json")

    def broken(trace):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(report_mod, "build_report", broken)
    assert outputs.write_outputs(str(tmp_path), load_trace(str(tmp_path)), command="record") == 1
    assert os.path.isfile(tmp_path / "trace.json")
    err = capsys.readouterr().err
    assert "ZeroDivisionError: a bug" in err and "the analysis failed on this trace" in err and "trace is kept" in err
