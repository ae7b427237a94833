"""Spans survive crashes: a SIGKILLed process's spool keeps what it recorded, and `llmtrace
run` whose agent is SIGKILLed mid-workload stops, says which process died and how, writes
the partial trace.json / report.json / report.md and exits non-zero.

The loss per kill in numbers (mapped spool vs one write() per batch): benchmarks/crash_survival.py.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time

import pytest

import llmtrace
from llmtrace import context, sink
from llmtrace.load import load_trace
from llmtrace.spool_format import read_spool
from llmtrace.timeline import Trace, load_spool_file

pytestmark = pytest.mark.timeout(180)


def _recording_child(out: str, mapped: bool, counter, settled) -> None:
    """Records spans forever; `counter` counts the closed ones. After the first 500 it
    pauses 0.3 s (far longer than the flush interval) and says so, then goes on."""
    sink.start(out, "victim", context.trace_id, mapped=mapped)
    llmtrace.recorder.set_enabled(True)
    n = 0
    while True:
        with llmtrace.span("work", i=n):
            pass
        n += 1
        counter.value = n
        if n == 500:
            time.sleep(0.3)
            settled.set()
        elif n % 50 == 0:
            time.sleep(0.001)


def _kill_recording_child(tmp_path, mapped: bool, when) -> tuple[int, list[int]]:
    """(spans counted, `i` of each work span in the spool file) after a SIGKILL at `when`."""
    ctx = mp.get_context("fork")
    counter, settled = ctx.RawValue("q", 0), ctx.Event()
    p = ctx.Process(target=_recording_child, args=(str(tmp_path), mapped, counter, settled))
    p.start()
    try:
        when(counter, settled)
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.join(30)
    assert p.exitcode == -signal.SIGKILL
    trace = Trace()
    load_spool_file(os.path.join(tmp_path, "spool", f"{p.pid}.lts"), trace)
    return counter.value, [s.attrs["i"] for s in trace.spans if s.name == "work"]


@pytest.mark.parametrize("mapped", [True, False], ids=["mapped", "write"])
def test_spans_flushed_before_a_sigkill_are_all_in_the_spool(tmp_path, mapped):
    def after_the_pause(counter, settled):
        assert settled.wait(30)

    counted, seen = _kill_recording_child(tmp_path, mapped, after_the_pause)
    assert counted >= 500
    assert seen[:500] == list(range(500))  # every span of before the pause, in order, none twice
    assert seen == list(range(len(seen))) and len(seen) <= counted


def test_mapped_spool_loses_only_the_last_milliseconds_of_a_busy_process(tmp_path):
    marks = []

    def mid_burst(counter, settled):
        assert settled.wait(30)
        time.sleep(0.2)  # the child records steadily again
        marks.append(counter.value)
        time.sleep(0.05)  # ten flush periods of the mapped spool, no pause in recording

    counted, seen = _kill_recording_child(tmp_path, True, mid_burst)
    assert marks[0] <= len(seen) <= counted and seen == list(range(len(seen)))
    sf = read_spool(os.path.join(tmp_path, "spool", os.listdir(os.path.join(tmp_path, "spool"))[0]))
    # a zero tail after the last batch; or, when the kill landed while the flush thread was
    # copying a batch in, that one batch is torn and read as unfinished (all before it kept)
    assert sf.truncated_at is None or "batch not finished" in sf.truncation_reason, sf.truncation_reason


# ---- llmtrace run with an agent SIGKILLed mid-workload ---------------------------------------------

RUN_CONFIG = """
model: {preset: tiny, seed: 0}
engine: {block_size: 16, max_num_seqs: 4, max_batched_tokens: 512, max_model_len: 512, num_blocks: 64}
workload: {num_requests: 8, concurrency: 2, input_len: {value: 16}, output_len: {value: 400}}
trace: {detail: basic}
"""


def _agent_spool(out: str) -> tuple[int, str] | None:
    spool = os.path.join(out, "spool")
    for name in os.listdir(spool) if os.path.isdir(spool) else ():
        path = os.path.join(spool, name)
        try:
            sf = read_spool(path)
        except Exception:
            continue  # header not written yet
        if sf.header.get("process_name") == "agent-0":
            return int(sf.header["pid"]), path
    return None


def _agent_steps(path: str) -> int:
    trace = Trace()
    load_spool_file(path, trace)
    return sum(s.name == "agent.step" for s in trace.spans)


def test_run_reports_a_sigkilled_agent_and_writes_the_partial_trace(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(RUN_CONFIG)
    out = str(tmp_path / "run")
    run = subprocess.Popen(
        [sys.executable, "-m", "llmtrace.cli", "run", "--config", str(config), "--out", out],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        found = None
        while time.monotonic() < deadline and run.poll() is None:
            found = found or _agent_spool(out)
            if found and _agent_steps(found[1]) >= 20:
                break
            time.sleep(0.1)
        assert found and run.poll() is None, "the agent never recorded 20 steps"
        agent_pid, agent_path = found
        os.kill(agent_pid, signal.SIGKILL)
        stdout, stderr = run.communicate(timeout=90)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
    assert run.returncode == 1, stderr
    killed = f"agent-0 (pid {agent_pid}) was killed by SIGKILL"
    assert "llmtrace run: FAILED" in stderr and killed in stderr and "Traceback" not in stderr
    report = json.loads(open(os.path.join(out, "report.json")).read())
    assert killed in report["failure"]
    assert os.path.getsize(os.path.join(out, "report.md")) > 0
    # Every span the agent's spool holds (all it recorded up to its last flush) is in trace.json.
    in_spool = Trace()
    load_spool_file(agent_path, in_spool)
    exported = load_trace(os.path.join(out, "trace.json"))
    mine = sorted((s.name, s.start_ns, s.span_id) for s in exported.spans if s.pid == agent_pid)
    assert len(mine) >= 20 * 4 and mine == sorted((s.name, s.start_ns, s.span_id) for s in in_spool.spans)
