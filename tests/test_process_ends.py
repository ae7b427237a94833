"""A process that dies is reported: `llmtrace record` of a program whose multiprocessing
worker is SIGKILLed and whose subprocess exits with code 3 warns about both (the parent
saw them reaped), says nothing of the workers that ended cleanly, and keeps the trace."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

PROGRAM = textwrap.dedent("""
    import multiprocessing as mp, os, signal, subprocess, sys, time

    def work():
        while True:
            time.sleep(0.01)

    if __name__ == "__main__":
        doomed = mp.Process(target=work, name="doomed-worker")
        doomed.start()
        time.sleep(0.5)
        os.kill(doomed.pid, signal.SIGKILL)
        doomed.join()
        subprocess.run([sys.executable, "-c", "import sys; sys.exit(3)"])
        fine = mp.Process(target=time.sleep, args=(0.1,), name="fine-worker")
        fine.start()
        fine.join()
""")


def test_dead_children_are_reported_with_how_they_died(tmp_path):
    prog = tmp_path / "prog.py"
    prog.write_text(PROGRAM)
    out = tmp_path / "run"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "llmtrace.cli",
            "record",
            "--sample-hz",
            "0",
            "--out",
            str(out),
            "--",
            sys.executable,
            str(prog),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    with open(os.path.join(out, "report.json")) as f:
        ends = json.load(f)["process_ends"]
    by_how = {e["how"]: e for e in ends}
    assert set(by_how) == {"killed by SIGKILL", "exited with code 3"}, ends
    assert by_how["killed by SIGKILL"]["name"] == "doomed-worker" and by_how["killed by SIGKILL"]["exit_code"] == -9
    assert "warning: process doomed-worker" in r.stdout and "killed by SIGKILL" in r.stdout
    assert not any(e["name"] == "fine-worker" for e in ends)


SIGTERMED = textwrap.dedent("""
    import os, signal, threading, time
    import llmtrace

    def serve_forever():
        with llmtrace.span("http.request", req="r1"):  # never ends: the process is stopped
            time.sleep(60)

    threading.Thread(target=serve_forever, name="handler", daemon=True).start()
    with llmtrace.span("decode.step", step=0):
        time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(60)
""")


@pytest.mark.parametrize("pure_python", ["0", "1"], ids=["c", "python"])
def test_spans_open_at_a_stop_signal_are_kept_and_flagged(tmp_path, pure_python):
    """SIGTERM mid-span, in two threads: both spans are in the trace, ending at the stop,
    flagged open-at-stop; the report says the process was stopped and how many it cut."""
    from llmtrace.analyze.report import build_report
    from llmtrace.load import load_trace

    prog = tmp_path / "prog.py"
    prog.write_text(SIGTERMED)
    out = tmp_path / "run"
    env = {**os.environ, "LLMTRACE_PURE_PYTHON": pure_python}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "llmtrace.cli",
            "record",
            "--sample-hz",
            "0",
            "--no-auto",
            "--out",
            str(out),
            "--",
            sys.executable,
            str(prog),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert r.returncode != 0  # the program died of its signal
    trace = load_trace(str(out))
    cut = {s.name: s for s in trace.spans if s.open_at_stop}
    assert set(cut) == {"http.request", "decode.step"} and cut["decode.step"].dur_ns >= 150_000_000
    assert cut["http.request"].tid != cut["decode.step"].tid and cut["http.request"].attrs == {"req": "r1"}
    proc = next(iter(trace.processes.values()))
    assert proc.closed["reason"] == "SIGTERM"
    (end,) = build_report(trace)["process_ends"]
    assert end["how"] == "stopped by SIGTERM with 2 spans open (kept, ending there)"
