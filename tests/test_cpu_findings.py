"""Per-thread CPU accounting (Linux schedstat) behind two findings: `cpu-starved` when the
step loop waits for a CPU (here: pinned to one CPU beside a busy process), and
`gil-contention` when it waits for the GIL while another Python thread runs; a run with
neither gets neither."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="needs Linux schedstat")

PROGRAM = textwrap.dedent("""
    import os, subprocess, sys, threading, time
    import llmtrace

    def busy(ms):
        end = time.perf_counter() + ms / 1000
        while time.perf_counter() < end:
            pass

    def metrics():  # pure Python, never releases the GIL on its own
        while True:
            sum(i * i for i in range(20000))

    mode, burner = sys.argv[1], None
    if mode == "gil":
        threading.Thread(target=metrics, name="metrics", daemon=True).start()
    if mode == "starved":
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        burner = subprocess.Popen(["sh", "-c", "while :; do :; done"])  # same CPU (inherited affinity)
    def forward():
        with llmtrace.span("forward"):
            busy(2)

    pool = None
    if mode == "pool":  # each step's forward on a thread pool, the loop waiting for its result
        from concurrent.futures import ThreadPoolExecutor
        pool = ThreadPoolExecutor(2)
    for _ in llmtrace.steps(range(150)):
        with llmtrace.span("preprocess"):
            busy(0.5)
        if pool is not None:
            pool.submit(forward).result()
        else:
            forward()
    if burner is not None:
        burner.kill()
""")


def _record(tmp_path, mode: str, sample_hz: str = "0") -> dict:
    prog = tmp_path / "prog.py"
    prog.write_text(PROGRAM)
    out = tmp_path / mode
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "llmtrace.cli",
            "record",
            "--sample-hz",
            sample_hz,
            "--out",
            str(out),
            "--",
            sys.executable,
            str(prog),
            mode,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    with open(os.path.join(out, "report.json")) as f:
        return {s["id"]: s for s in json.load(f)["suggestions"]}


def test_starved_steps_are_reported_with_their_runqueue_share(tmp_path):
    found = _record(tmp_path, "starved")
    s = found["cpu-starved"]
    assert s["evidence"]["runqueue_share_of_steps"] > 0.3
    assert s["est_saving_ms_per_token"] > 0.5
    assert "gil-contention" not in found


def test_gil_wait_is_reported_with_the_thread_that_held_it(tmp_path):
    found = _record(tmp_path, "gil")
    s = found["gil-contention"]
    assert s["evidence"]["gil_wait_share_of_steps"] > 0.2
    assert s["evidence"]["threads"][0]["thread"] == "metrics"


def test_a_quiet_run_gets_neither(tmp_path):
    found = _record(tmp_path, "quiet")
    assert "cpu-starved" not in found and "gil-contention" not in found


def test_a_loop_waiting_for_its_thread_pool_is_not_gil_contention(tmp_path):
    """The loop blocks on the pool's result while a pool thread runs the forward: CPU time is
    read 20 times a second, so the two look busy at once; the stack samples show the loop
    waiting (it was reported as waiting for the GIL, 48% of the steps, on an asyncio server
    whose forwards ran on `asyncio.to_thread`)."""
    found = _record(tmp_path, "pool", sample_hz="250")
    assert "gil-contention" not in found
