"""report.json's schema, its text and markdown renderings, and `llmtrace analyze`."""

import json

import pytest
from synthetic import MS, EngineTraceBuilder, record_pipeline

from llmtrace.analyze import build_report, render_markdown, render_text
from llmtrace.cli import main


@pytest.fixture(scope="module")
def report():
    b = EngineTraceBuilder(span_cost_ns=400.0)
    b.steps(3, batch=1, prefill=True, device={"forward": 30.0})
    b.steps(30, batch=4, nested={"preprocess": [("logging.debug", 7.0, {}), ("np.concatenate", 4.8, {})]})
    t0 = 5_000 * MS
    b.request("a", t0, [t0 + 40 * MS, t0 + 70 * MS])
    return build_report(b.build())


def test_report_has_the_design_schema(report):
    assert {"summary", "breakdown", "suggestions", "tracing"} <= report.keys()
    s = report["summary"]
    for key in ("requests", "output_tokens", "duration_s", "throughput_tok_s", "ttft_ms", "tpot_ms", "itl_ms"):
        assert key in s
    assert set(s["ttft_ms"]) >= {"p50", "p90", "p99"}
    bd = report["breakdown"]
    for key in (
        "per_token_ms",
        "model_ms",
        "overhead_ms",
        "overhead_fraction",
        "stages",
        "decode",
        "prefill",
        "headline",
    ):
        assert key in bd
    for row in bd["stages"]:
        assert set(row) >= {
            "name",
            "ms_per_step",
            "ms_per_token",
            "share",
            "count",
            "p50_ms",
            "p99_ms",
            "top_functions",
        }
    assert bd["decode"]["steps"] == 30 and bd["prefill"]["steps"] == 3
    for sug in report["suggestions"]:
        assert set(sug) == {
            "id",
            "title",
            "stage",
            "evidence",
            "est_saving_ms_per_token",
            "est_speedup",
            "est_saving_interval",
            "fix",
            "impact",
        }
    assert [x["id"] for x in report["suggestions"]][:2] == ["log-in-hot-path", "concat-padding"]
    t = report["tracing"]
    assert set(t) >= {"spans_recorded", "spans_dropped", "instrumentation_cost_us_per_token", "processes"}
    records = t["records"]
    assert t["instrumentation_cost_us_per_token"] == pytest.approx(records * 400 / bd["tokens"] / 1e3)
    json.dumps(report)  # JSON-safe as it is


def test_text_rendering_has_headline_tables_and_ranked_fixes(report):
    text = render_text(report)
    assert report["breakdown"]["headline"] in text
    assert "Per-token breakdown" in text and "ms/token" in text and "preprocess" in text
    assert "logging.debug" in text  # top function inside the stage
    assert text.index("log-in-hot-path") < text.index("concat-padding")
    bracketed = {**report["suggestions"][0], "fix": "copy [batch] ids"}
    assert "[batch]" in render_text({**report, "suggestions": [bracketed]})


def test_markdown_rendering(report):
    md = render_markdown(report)
    assert md.startswith("# llmtrace report")
    assert "| stage | ms/step | ms/token |" in md
    assert "1. **Logging / array formatting in the hot path" in md
    assert "saves ~" in md and "no time saved" not in md


def test_a_finding_that_saves_no_time_says_what_it_buys_instead():
    b = EngineTraceBuilder(device_timing=False)  # forward timed on the host: the device time lands in sync.wait
    b.steps(30)
    rep = build_report(b.build())
    (s,) = [s for s in rep["suggestions"] if s["id"] == "unsynced-gpu-timing"]
    assert s["est_saving_ms_per_token"] == 0 and "ms/token of device work now shows as sync" in s["impact"]
    md = render_markdown(rep)
    assert f"(`unsynced-gpu-timing`, stage sync): no time saved; {s['impact']}." in md
    assert "saves ~0.000" not in md
    assert s["impact"] in render_text(rep)


def test_analyze_command_prints_the_table(tmp_path, capsys):
    record_pipeline(tmp_path, steps=20, inject_s=0.002)
    assert main(["analyze", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "ms/token = " in out and "postprocess" in out and "Per-token breakdown" in out
    assert main(["analyze", str(tmp_path), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["breakdown"]["steps"] == 20 and rep["breakdown"]["stages"][0]["name"] == "postprocess"
    assert main(["analyze", str(tmp_path), "--markdown"]) == 0
    assert capsys.readouterr().out.startswith("# llmtrace report")


def test_analyze_command_bad_path_is_a_clear_error(tmp_path, capsys):
    assert main(["analyze", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "missing" in err and "Traceback" not in err


def test_the_hand_found_overheads_are_found_automatically():
    """The motivating case: a 40 ms decode token whose bare model takes 25 ms."""
    b = EngineTraceBuilder()
    b.steps(
        40,
        batch=1,
        agent_order=["tcp.recv", "shm.read", "preprocess", "forward", "sync.wait", "sampling", "shm.write", "tcp.send"],
        device={"forward": 25.0, "sampling": 0},
        agent={"sampling": 0.0},
        nested={
            "preprocess": [("logging.debug", 7.0, {}), ("np.concatenate", 4.8, {})],
            "sampling": [("sampling.host", 2.5, {"logits_bytes": 128256 * 4})],
        },
    )
    rep = build_report(b.build())
    bd = rep["breakdown"]
    assert bd["model_ms"] == pytest.approx(25.0, rel=0.01)
    assert bd["headline"].startswith(f"{bd['per_token_ms']:.1f} ms/token = 25.0 model + 12.3 preprocess + 2.5 sampling")
    saving = {s["id"]: s["est_saving_ms_per_token"] for s in rep["suggestions"]}
    assert saving["log-in-hot-path"] == pytest.approx(7.0, rel=0.1)
    assert saving["concat-padding"] == pytest.approx(4.8, rel=0.1)
    assert saving["full-logits-transfer"] == pytest.approx(2.5, rel=0.1)
    assert [s["id"] for s in rep["suggestions"][:3]] == ["log-in-hot-path", "concat-padding", "full-logits-transfer"]
