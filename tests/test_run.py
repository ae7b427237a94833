"""`llmtrace run` end to end on a tiny workload, and its config errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from llmtrace.load import load_trace

SMALL = [
    "--set",
    "workload.num_requests=6",
    "--set",
    "workload.concurrency=3",
    "--set",
    "workload.input_len={dist: fixed, value: 24}",
    "--set",
    "workload.output_len={dist: fixed, value: 8}",
]


def _run(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "llmtrace.cli", "run", *args], capture_output=True, text=True, timeout=timeout
    )


def test_run_writes_a_valid_trace_and_report(tmp_path):
    out = tmp_path / "run"
    r = _run("--config", "examples/quickstart.yaml", "--out", str(out), *SMALL)
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "report.json").read_text())
    assert {"summary", "breakdown", "suggestions", "tracing"} <= report.keys()
    assert report["summary"]["requests"] == 6 and report["summary"]["output_tokens"] == 48
    stages = {s["name"] for s in report["breakdown"]["stages"]}
    assert {"tcp", "shm", "preprocess", "schedule"} <= stages
    assert report["breakdown"]["model_ms"] > 0
    assert report["tracing"]["spans_dropped"] == 0
    assert (out / "report.md").read_text().strip()
    trace = load_trace(str(out / "trace.json"))  # the exported file loads back on its own
    assert {p.name for p in trace.processes.values()} >= {"client", "master", "agent-0"}
    steps = {s.step for s in trace.spans if s.name == "master.step"}
    assert steps and steps == {s.step for s in trace.spans if s.name == "agent.step"}
    assert "ms/token" in r.stdout and "trace.json" in r.stdout


@pytest.mark.parametrize(
    "override, expected",
    [
        ("engine.block_size=17", "engine.block_size: 17 is not allowed; use one of 8, 16, 32"),
        ("workload.arival=poisson", "workload.arival: unknown key (did you mean arrival?)"),
        ("model.dtype=float8", "model.dtype"),
    ],
)
def test_bad_config_values_are_named(tmp_path, override, expected):
    r = _run("--config", "examples/quickstart.yaml", "--out", str(tmp_path / "x"), "--set", override, timeout=60)
    assert r.returncode == 2
    assert expected in r.stderr and "Traceback" not in r.stderr
    assert not os.path.exists(tmp_path / "x" / "spool"), "nothing started for a bad config"


def test_missing_and_broken_config_files(tmp_path):
    r = _run("--config", str(tmp_path / "nope.yaml"), timeout=60)
    assert r.returncode == 2 and "nope.yaml" in r.stderr and "Traceback" not in r.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("engine:\n  block_size: [16\n")
    r = _run("--config", str(bad), timeout=60)
    assert r.returncode == 2 and "bad.yaml:3: invalid YAML" in r.stderr and "Traceback" not in r.stderr


def test_a_fixed_prompt_stays_out_of_the_shared_trace_without_capture_text():
    from engine.commands.run import _shareable_config
    from engine.config import load_config

    secret = "the launch codes are 0000"
    cfg = load_config("examples/quickstart.yaml", [f"workload.prompt={secret!r}"])
    assert secret not in str(_shareable_config(cfg))
    shared = load_config("examples/quickstart.yaml", [f"workload.prompt={secret!r}", "trace.capture_text=true"])
    assert _shareable_config(shared)["workload"]["prompt"] == secret
