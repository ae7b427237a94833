"""`llmtrace record` on serving programs it has never seen (examples/pipelines/), with no
change to their code: the steps are inferred, the planted mistakes are found with the
program's function responsible, and the clean variants get none of those findings.
(benchmarks/diagnosis_accuracy.py scores the estimates against measured savings.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# pipeline -> (arguments, {rule: function responsible}) for the findings that rest on spans
# (the sample-based ones are scored by the benchmark over repeated recordings)
CASES = {
    "thread_queue_server": (
        ["--requests", "24"],
        {
            "polling-sleep": "Engine.admit",
            "full-logits-transfer": "Engine.argmax_on_host",
            "log-in-hot-path": "Engine.step",
            "detokenize-whole-sequence": "Engine.stopped",
        },
    ),
    "tcp_master_agent": (["--requests", "8"], {"tcp-nodelay": None, "serialization-in-hot-path": "send_frame"}),
    "mp_queue_workers": (["--requests", "16", "--workers", "1", "--concurrency", "6"], {"wait-in-step": "take_new"}),
    "asyncio_pipe_worker": (
        ["--requests", "24"],
        {"full-logits-transfer": "worker", "log-in-hot-path": "Scheduler.run"},
    ),
    "zmq_engine_core": (
        ["--requests", "24"],
        {"wait-in-step": "EngineCore.admit", "full-logits-transfer": "EngineCore.step"},
    ),
    "fastapi_batcher": (
        ["--requests", "24"],
        {
            "polling-sleep": "Batcher.run",
            "full-logits-transfer": "Batcher.argmax_on_host",
            "serialization-in-hot-path": "Batcher.step",
        },
    ),
}

pytestmark = pytest.mark.slow


def record(out, pipeline: str, args: list[str], timeout_s: float = 200, **env) -> dict:
    """The report of `llmtrace record` on the pipeline. A run past `timeout_s` (under the
    suite's 300 s per test) fails with every process's Python stacks (faulthandler, SIGABRT
    to the whole session) instead of hanging the suite."""
    cmd = [
        sys.executable,
        "-m",
        "llmtrace.cli",
        "record",
        "--out",
        str(out),
        "--",
        sys.executable,
        os.path.join(ROOT, "examples", "pipelines", pipeline + ".py"),
        *args,
    ]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, "PYTHONFAULTHANDLER": "1", **env},
    )
    try:
        _, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGABRT)
        try:
            _, err = proc.communicate(timeout=30)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"{pipeline} still running after {timeout_s:g} s; its stacks:\n{err[-20000:]}")
    assert proc.returncode == 0, err[-2000:]
    with open(os.path.join(out, "report.json")) as f:
        report = json.load(f)
    assert not report["rule_errors"], report["rule_errors"]
    return report


def responsible(s: dict) -> list[str]:
    return [r["function"] for r in s["evidence"].get("responsible", [])]


@pytest.mark.parametrize("pipeline", list(CASES))
def test_planted_mistakes_are_found_with_their_function(tmp_path, pipeline):
    args, expected = CASES[pipeline]
    report = record(tmp_path / "planted", pipeline, args)
    assert report["breakdown"]["steps"] > 10 and report["breakdown"]["steps_from"]["source"] == "model-cadence"
    found = {s["id"]: s for s in report["suggestions"]}
    for rule, function in expected.items():
        assert rule in found, (rule, sorted(found))
        assert found[rule]["est_saving_ms_per_token"] > 0
        if function is not None:
            assert any(function in f for f in responsible(found[rule])), (rule, responsible(found[rule]))


@pytest.mark.parametrize("pipeline", list(CASES))
def test_clean_variant_has_none_of_them(tmp_path, pipeline):
    args, expected = CASES[pipeline]
    report = record(tmp_path / "clean", pipeline, args, PIPELINE_CLEAN="1")
    assert report["breakdown"]["steps"] > 10
    assert not set(expected) & {s["id"] for s in report["suggestions"]}, report["suggestions"]
