"""`llmtrace record` on a serving program it has never seen (examples/pipelines/), with no
change to its code: the steps are inferred, the planted mistakes are found with the
program's function responsible, and the clean variant gets none of those findings."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIPELINE = os.path.join(ROOT, "examples", "pipelines", "thread_queue_server.py")
PLANTED = {"polling-sleep": "Engine.admit", "full-logits-transfer": "Engine.argmax_on_host",
           "log-in-hot-path": "Engine.step"}

pytestmark = pytest.mark.slow


def record(out, **env) -> dict:
    cmd = [sys.executable, "-m", "llmtrace.cli", "record", "--out", str(out), "--", sys.executable, PIPELINE,
           "--requests", "24", "--max-tokens", "32"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env={**os.environ, **env})
    assert r.returncode == 0, r.stderr[-2000:]
    with open(os.path.join(out, "report.json")) as f:
        return json.load(f)


def test_unannotated_pipeline_gets_steps_and_its_planted_mistakes(tmp_path):
    report = record(tmp_path / "planted")
    bd = report["breakdown"]
    assert bd["steps"] >= 24 * 32 / 8 * 0.8 and bd["tokens"] == 24 * 32  # batch of each forward = tokens
    found = {s["id"]: s for s in report["suggestions"]}
    for rule, function in PLANTED.items():
        assert rule in found, (rule, sorted(found))
        who = [r["function"] for r in found[rule]["evidence"]["responsible"]]
        assert any(function in w for w in who), (rule, who)
        assert found[rule]["est_saving_ms_per_token"] > 0


def test_clean_variant_has_none_of_them(tmp_path):
    report = record(tmp_path / "clean", PIPELINE_CLEAN="1")
    assert report["breakdown"]["steps"] > 0
    assert not set(PLANTED) & {s["id"] for s in report["suggestions"]}, report["suggestions"]
