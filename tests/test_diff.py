"""`llmtrace diff`: a change that removes a stage's cost is significant in that row and
the finding is gone; rows that did not change stay within noise; bad input is a clear
error."""

from __future__ import annotations

import json
import random

from synthetic import EngineTraceBuilder

from llmtrace.analyze import build_report
from llmtrace.analyze.analysis import Analysis
from llmtrace.analyze.diff import diff_runs
from llmtrace.cli import main as cli_main
from llmtrace.export.chrome import write_chrome_trace


def _run(padding_ms: float, seed: int):
    """60 decode steps with jittered stage times; padding_ms of np.concatenate in preprocess."""
    rng = random.Random(seed)
    b = EngineTraceBuilder(gpu=False)
    for _ in range(60):
        nested = {"preprocess": [("np.concatenate", padding_ms * rng.uniform(0.9, 1.1), {})]} if padding_ms else None
        b.step(
            batch=4,
            master={"schedule": rng.uniform(0.2, 0.4)},
            device={"forward": rng.uniform(4.5, 5.5)},
            nested=nested,
        )
    return b.build()


def _diff(a, b) -> dict:
    return diff_runs(Analysis(a), Analysis(b), build_report(a), build_report(b))


def test_a_removed_cost_is_significant_and_its_finding_gone():
    d = _diff(_run(2.0, 1), _run(0.0, 2))
    rows = {r["label"]: r for r in d["rows"]}
    pre = rows["preprocess"]
    assert pre["significant"] and pre["change_ms"] < -0.4 and pre["ci_high_ms"] < 0
    assert pre["change_ms"] == round(pre["after_ms"] - pre["before_ms"], 4)
    assert rows["per token"]["significant"] and rows["per token"]["change_ms"] < 0
    assert not rows["schedule"]["significant"]  # the same jitter both times
    assert {f["id"]: f["status"] for f in d["findings"]}["concat-padding"] == "gone"


def test_the_same_run_twice_changes_nothing():
    t = _run(1.0, 3)
    d = _diff(t, _run(1.0, 3))
    assert all(not r["significant"] and r["change_ms"] == 0 for r in d["rows"])
    assert all(f["status"] == "still" for f in d["findings"])


def test_cli_text_markdown_json_and_errors(tmp_path, capsys):
    paths = []
    for name, ms in (("a.json", 2.0), ("b.json", 0.0)):
        write_chrome_trace(_run(ms, 5), str(tmp_path / name))
        paths.append(str(tmp_path / name))
    capsys.readouterr()
    assert cli_main(["diff", *paths]) == 0
    out = capsys.readouterr().out
    assert "significant" in out and "within noise" in out and "concat-padding" in out
    assert cli_main(["diff", *paths, "--markdown"]) == 0
    assert "| preprocess |" in capsys.readouterr().out
    assert cli_main(["diff", *paths, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"][0]["label"] == "per token"
    assert cli_main(["diff", paths[0], str(tmp_path / "missing")]) == 2
    assert "missing: no such file" in capsys.readouterr().err
