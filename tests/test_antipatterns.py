"""The antipattern switches are faithful: slower, never wrong. Greedy tokens match the
clean engine, and what the engine records (d2h_bytes, no sync span) changes as it would."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from test_model import Driver

import llmtrace
from engine.config import AntipatternsConfig, ModelConfig
from engine.mistaken_runner import MistakenModelRunner, make_runner
from engine.model_runner import ModelRunner
from llmtrace.timeline import load_spool_dir

TINY = ModelConfig(preset="tiny", dtype="float32", device="cpu", seed=0)
PROMPTS = {0: [1, 5, 6, 7, 8], 1: [1] + list(range(200, 240)), 2: [1, 9]}
MISTAKES = ["log_arrays", "concat_padding", "host_sampling", "host_timed_forward", "gc_churn"]


def _generate(runner: ModelRunner, steps: int = 6) -> dict[int, list[int]]:
    d = Driver(runner)
    for seq_id, prompt in PROMPTS.items():
        d.add(seq_id, prompt)
    for _ in range(steps):
        d.step()
    return d.tokens


@pytest.fixture(scope="module")
def clean_tokens():
    return _generate(ModelRunner(TINY, block_size=16, num_blocks=64))


@pytest.mark.parametrize("mistake", MISTAKES)
def test_mistake_keeps_greedy_tokens(mistake, clean_tokens):
    ap = dataclasses.replace(AntipatternsConfig(), **{mistake: True})
    runner = make_runner(TINY, block_size=16, num_blocks=64, antipatterns=ap)
    assert isinstance(runner, MistakenModelRunner)
    assert _generate(runner) == clean_tokens


def test_host_sampling_reports_the_full_logits_copy(tmp_path):
    runner = make_runner(TINY, block_size=16, num_blocks=64, antipatterns=AntipatternsConfig(host_sampling=True))
    clean = ModelRunner(TINY, block_size=16, num_blocks=64)
    llmtrace.configure(out=str(tmp_path), process_name="agent-0", propagate=False)
    try:
        _generate(runner, steps=2)
        _generate(clean, steps=2)
    finally:
        llmtrace.shutdown()
    sampling = [s for s in load_spool_dir(str(tmp_path)).spans if s.name == "sampling"]
    vocab = runner.model.config.vocab_size
    sizes = sorted({s.attrs["d2h_bytes"] for s in sampling})
    assert sizes == [8 * len(PROMPTS), 4 * vocab * len(PROMPTS)]


def test_host_timed_forward_drops_the_sync_span(tmp_path):
    runner = make_runner(TINY, block_size=16, num_blocks=64, antipatterns=AntipatternsConfig(host_timed_forward=True))
    llmtrace.configure(out=str(tmp_path), process_name="agent-0", propagate=False)
    try:
        _generate(runner, steps=2)
    finally:
        llmtrace.shutdown()
    names = {s.name for s in load_spool_dir(str(tmp_path)).spans}
    assert "sync.wait" not in names and {"forward", "sampling"} <= names


def test_concat_padding_pads_block_tables_with_minus_one():
    from test_model import MiniAllocator, make_step

    from engine import antipatterns

    alloc = MiniAllocator(64, 16, seed=1)
    step = make_step(0, alloc, [(0, list(range(1, 40)), 0), (1, [1, 2], 0)])
    rebuilt = antipatterns.pad_by_concatenate(step, 16)
    for name in ("input_ids", "positions", "slot_mapping"):
        np.testing.assert_array_equal(getattr(rebuilt, name), getattr(step, name))
    np.testing.assert_array_equal(rebuilt.block_tables[0, :3], step.block_tables[0, :3])
    assert (rebuilt.block_tables[1, 1:] == -1).all()


def test_no_mistake_switched_on_gives_the_clean_runner():
    assert type(make_runner(TINY, block_size=16, num_blocks=8, antipatterns=AntipatternsConfig())) is ModelRunner
