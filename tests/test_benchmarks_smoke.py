"""benchmarks/engine_throughput.py end to end at the smallest sizes, so it cannot rot
unnoticed: the engine (`llmtrace serve` + agent, traced and untraced) and both transformers
paths produce every requested token, the trace yields a step breakdown, the tables print."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "engine_throughput.py"
CONCURRENCY = 2
REPEATS = 2


def _load_script():
    spec = importlib.util.spec_from_file_location("engine_throughput", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


bench = _load_script()
SIZES = bench.Sizes(input_min=8, input_max=12, output_len=4, min_requests=2, requests_per_slot=1)


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("throughput")
    return bench.run([CONCURRENCY], SIZES, threads=1, out=str(out), repeats=REPEATS, log=lambda _: None), out


def test_every_system_measured_with_exact_lengths(result):
    res, _ = result
    assert set(res.tok_s) == {bench.ENGINE_TRACED, bench.ENGINE_PLAIN, bench.HF_GENERATE, bench.HF_GENERATE_BATCH}
    assert all(by_c[CONCURRENCY] > 0 for by_c in res.tok_s.values())
    assert res.notes == []  # both transformers paths generated exactly output_len tokens per request


def test_breakdown_from_the_traced_run(result):
    from llmtrace.analyze.report import build_report
    from llmtrace.load import load_trace

    res, out = result
    d = res.breakdown[CONCURRENCY]
    run_dir = out / f"c{CONCURRENCY}"
    assert (run_dir / "spool").is_dir()  # kept for `llmtrace analyze`
    # the warm-up request plus each round's own requests (distinct ids, so not merged)
    requests = 1 + REPEATS * SIZES.num_requests(CONCURRENCY)
    assert build_report(load_trace(str(run_dir)))["summary"]["requests"] == requests
    assert d["steps"] >= REPEATS * SIZES.output_len  # at least one step per output token of a round
    assert d["model_ms_per_step"] > 0 and d["other_ms_per_step"] > 0
    assert d["model_ms_per_step"] + d["other_ms_per_step"] == pytest.approx(d["ms_per_step"])
    assert d["top"] and all(name != "model" for name, _ in d["top"])


def test_prompts_match_the_engine_workload():
    from engine.tokenizer import Tokenizer

    cfg = bench.run_config(3, SIZES)
    prompts = bench.prompt_token_ids(cfg, Tokenizer())
    assert len(prompts) == SIZES.num_requests(3) == 3
    assert all(SIZES.input_min <= len(p) <= SIZES.input_max for p in prompts)
    assert cfg.engine.max_num_seqs == 3 and cfg.workload.concurrency == 3


def test_tables_print(result, capsys):
    res, _ = result
    bench.render(res, [CONCURRENCY], bench.header(SIZES, 1, 1))
    text = capsys.readouterr().out
    assert "transformers generate_batch (continuous)" in text and "tracing cost" in text
    assert f"C={CONCURRENCY}" in text and "torch threads per model process: 1" in text
