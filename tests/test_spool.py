"""Spool files end to end, per backend: sink -> spool file -> trace, drops, truncation, child processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest

import llmtrace
from llmtrace import context, sink
from llmtrace.spool_format import read_spool
from llmtrace.timeline import load_spool_dir


@pytest.fixture
def spool_dir(tmp_path, backend):
    """A running sink writing under tmp_path for the chosen backend; stopped afterwards."""
    sink.start(str(tmp_path), "parent", context.trace_id)
    yield tmp_path
    sink.stop()


def _spool_file(d, pid=None):
    return os.path.join(d, "spool", f"{pid or os.getpid()}.lts")


def test_records_round_trip_through_the_spool(spool_dir, backend):
    with llmtrace.span("master.step", step=1, batch=4):
        with llmtrace.span("schedule", ratio=0.5):
            llmtrace.instant("preempt", req="r3")
    llmtrace.counter("running", 2)
    sink.stop()
    tr = load_spool_dir(str(spool_dir))
    (proc,) = tr.processes.values()
    got = (proc.pid, proc.name, proc.header["backend"], proc.truncated_at)
    assert got == (os.getpid(), "parent", backend.name, None)
    assert proc.threads[threading.get_native_id()] == threading.current_thread().name
    spans = {s.name: s for s in tr.spans}
    assert spans["master.step"].attrs == {"batch": 4} and spans["schedule"].attrs == {"ratio": 0.5}
    assert spans["schedule"].parent_id == spans["master.step"].span_id and spans["schedule"].step == 1
    (inst,) = tr.instants
    assert (inst.name, inst.attrs, inst.parent_id) == ("preempt", {"req": "r3"}, spans["schedule"].span_id)
    (cnt,) = tr.counters
    assert (cnt.name, cnt.value) == ("running", 2.0)


def test_overflow_is_reported_in_the_spool_meta(spool_dir, backend):
    n_over = 40
    old = sys.getswitchinterval()
    sys.setswitchinterval(30)  # keep the flush thread off the GIL until the buffer has overflowed
    try:
        for _ in range(backend.mod.BUFFER_CAP + n_over):
            with llmtrace.span("x"):
                pass
        sink.flush()
    finally:
        sys.setswitchinterval(old)
    sink.stop()
    tr = load_spool_dir(str(spool_dir))
    assert tr.processes[os.getpid()].dropped == {threading.get_native_id(): n_over}
    assert tr.spans_dropped == n_over
    assert sum(s.name == "x" for s in tr.spans) == backend.mod.BUFFER_CAP


def _write_two_batches(spool_dir) -> tuple[str, int]:
    """A spool file of two batches; returns its path and the offset of the second batch."""
    with llmtrace.span("first"):
        pass
    sink.flush()
    path = _spool_file(spool_dir)
    second = sink.current().written
    with llmtrace.span("second"):
        pass
    sink.stop()
    return path, second


def test_truncated_batch_is_tolerated_and_reported(spool_dir):
    path, second = _write_two_batches(spool_dir)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(second + (size - second) // 2)  # cut in the middle of the second batch
    sf = read_spool(path)
    assert sf.truncated_at == second and "cut" in sf.truncation_reason
    tr = load_spool_dir(str(spool_dir))
    assert [s.name for s in tr.spans] == ["first"]
    assert tr.processes[os.getpid()].truncated_at == second


def test_garbage_after_the_last_batch_is_tolerated_and_reported(spool_dir):
    path, _ = _write_two_batches(spool_dir)
    end = os.path.getsize(path)
    with open(path, "ab") as f:
        f.write(b"\x13garbage that is not a batch" * 3)
    sf = read_spool(path)
    assert sf.truncated_at == end and sf.truncation_reason.endswith(": bad batch magic")
    tr = load_spool_dir(str(spool_dir))
    assert sorted(s.name for s in tr.spans) == ["first", "second"]
    assert tr.processes[os.getpid()].truncated_at == end


_CHILD = """
import json, sys
import llmtrace
from llmtrace.context import Carrier
carrier = Carrier.from_wire(json.loads(sys.argv[1]))
with llmtrace.span("agent.step", follows=carrier):
    with llmtrace.span("forward"):
        pass
llmtrace.shutdown()
"""


def test_child_process_span_follows_the_parents_carrier(spool_dir, backend):
    env = {
        **os.environ,
        "LLMTRACE_OUT": str(spool_dir),
        "LLMTRACE_PROCESS_NAME": "agent-0",
        "LLMTRACE_TRACE_ID": f"{context.trace_id:x}",
        "LLMTRACE_PURE_PYTHON": "1" if backend.name == "python" else "0",
    }
    with llmtrace.span("master.step", step=11):
        carrier = context.current()
        child = subprocess.run(
            [sys.executable, "-c", _CHILD, json.dumps(list(carrier))],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert child.returncode == 0, child.stderr
    sink.stop()
    tr = load_spool_dir(str(spool_dir))
    assert sorted(p.name for p in tr.processes.values()) == ["agent-0", "parent"]
    master = next(s for s in tr.spans if s.name == "master.step")
    agent = next(s for s in tr.spans if s.name == "agent.step")
    fwd = next(s for s in tr.spans if s.name == "forward")
    assert carrier == (context.trace_id, master.span_id, 11)
    assert agent.pid != master.pid and agent.link_id == master.span_id and agent.step == 11
    assert fwd.parent_id == agent.span_id and fwd.step == 11
    assert tr.processes[agent.pid].header["backend"] == backend.name


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_child_writes_its_own_spool_file(spool_dir):
    with llmtrace.span("before.fork"):
        pass  # still buffered when the process forks: must stay the parent's
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            with llmtrace.span("child.work"):
                pass
            llmtrace.shutdown()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    sink.stop()
    assert os.path.exists(_spool_file(spool_dir, pid))
    tr = load_spool_dir(str(spool_dir))
    assert tr.processes[pid].name == "parent-child"
    by_pid = {p: sorted(s.name for s in tr.spans if s.pid == p) for p in tr.processes}
    assert by_pid[pid] == ["child.work"] and "before.fork" in by_pid[os.getpid()]
    child_span = next(s for s in tr.spans if s.name == "child.work")
    assert child_span.span_id >> 40 == pid and child_span.tid == pid


def test_every_spool_file_names_strings_interned_before_it(tmp_path, backend):
    for run in ("a", "b"):  # the same names in two runs of one process
        sink.start(str(tmp_path / run), run, context.trace_id)
        with llmtrace.span("reused.name", mode="same"):
            pass
        sink.stop()
        (span,) = [s for s in load_spool_dir(str(tmp_path / run)).spans if s.name != "llmtrace.calibrate"]
        assert (span.name, span.stage, span.attrs) == ("reused.name", "reused", {"mode": "same"})
