"""ModelRunner: spans per step, KV cache sizing, output arrays, seeded sampling through steps."""

from __future__ import annotations

import numpy as np
import pytest
from test_model import Driver, MiniAllocator, make_step

import llmtrace
from engine.config import ModelConfig
from engine.model_runner import ModelRunner, kv_block_bytes
from engine.sequence import PLACEHOLDER
from llmtrace.timeline import load_spool_dir

TINY = ModelConfig(preset="tiny", dtype="float32", device="cpu", seed=0)


@pytest.fixture(scope="module")
def runner():
    return ModelRunner(TINY, block_size=16, num_blocks=64)


def test_execute_records_the_agent_spans_in_order(runner, tmp_path):
    llmtrace.configure(out=str(tmp_path), process_name="agent-0", propagate=False)
    try:
        d = Driver(runner)
        d.add(0, [1, 5, 6, 7])
        d.add(1, [1, 9])
        d.step()
        d.step()
    finally:
        llmtrace.shutdown()
    spans = [s for s in load_spool_dir(str(tmp_path)).spans if s.stage != "gc"]
    for step in (0, 1):
        got = [s for s in spans if s.step == step]
        assert [s.name for s in got] == ["preprocess", "forward", "sampling", "sync.wait"]
        assert all(a.end_ns <= b.start_ns for a, b in zip(got, got[1:]))
    first = next(s for s in spans if s.name == "preprocess")
    assert first.attrs == {"seqs": 2, "tokens": 6}


def test_kv_cache_sized_from_a_memory_budget():
    per_block = 2 * 4 * 16 * 4 * 32 * 4  # k+v, layers, block_size, kv heads, head_dim, float32
    r = ModelRunner(TINY, block_size=16, kv_cache_memory=per_block * 10 + 5)
    assert kv_block_bytes(r.model, 16) == per_block
    assert r.num_blocks == 10
    assert len(r.kv_caches) == 4 and r.kv_caches[0][0].shape == (10, 16, 4, 32)
    with pytest.raises(ValueError, match="holds no block"):
        ModelRunner(TINY, block_size=16, kv_cache_memory=per_block - 1)


def test_outputs_and_block_table_padding(runner):
    """StepOutput arrays; -1 and 0 padding of block tables are equivalent (pad entries never read)."""
    alloc = MiniAllocator(runner.num_blocks, seed=4)
    batch = [(0, [1] + list(range(100, 140)), 0), (1, [1, 2000, 3000], 0)]
    step = make_step(0, alloc, batch, temperature=[0.0, 0.8], seed=[-1, 3])
    assert (step.block_tables == -1).any()
    a = runner.execute(step)
    step.block_tables[step.block_tables < 0] = 0
    b = runner.execute(step)
    assert a.token_ids.dtype == np.int32 and a.logprobs.dtype == np.float32 and a.token_ids.shape == (2,)
    np.testing.assert_array_equal(a.token_ids, b.token_ids)
    np.testing.assert_allclose(a.logprobs, b.logprobs, rtol=1e-5)
    assert (a.logprobs <= 0).all()


def test_the_most_likely_tokens_cross_to_the_host_only_when_asked_for(runner):
    alloc = MiniAllocator(runner.num_blocks, seed=5)
    batch = [(0, [1, 300, 301], 0), (1, [1, 7], 0)]
    plain = runner.execute(make_step(0, alloc, batch, temperature=[0.0, 0.0]))
    assert plain.top_ids.shape == plain.top_logprobs.shape == (2, 0)
    step = make_step(0, alloc, batch, temperature=[0.0, 0.0])
    step.top_logprobs = 3
    out = runner.execute(step)
    assert out.top_ids.dtype == np.int32 and out.top_ids.shape == out.top_logprobs.shape == (2, 3)
    np.testing.assert_array_equal(out.top_ids[:, 0], out.token_ids)  # greedy: the likeliest token
    np.testing.assert_allclose(out.top_logprobs[:, 0], out.logprobs, rtol=1e-5)
    assert (np.diff(out.top_logprobs, axis=1) <= 0).all()


def test_seeded_request_generates_the_same_alone_or_batched(runner):
    def run(with_neighbours: bool) -> list[int]:
        d = Driver(runner, seed=int(with_neighbours))
        d.add(7, [1, 40, 41, 42])
        ids, temps, seeds = [7], [1.0], [1234]
        if with_neighbours:
            d.add(8, [1, 50, 51])
            d.add(9, [1, 60])
            ids, temps, seeds = [8, 7, 9], [1.0, 1.0, 0.0], [-1, 1234, -1]
        for _ in range(6):
            d.step(ids, temperature=temps, seed=seeds)
        return d.tokens[7][4:]

    alone = run(False)
    assert run(True) == alone
    assert len(set(alone)) > 1  # sampled at temperature 1, not a constant


def run_pipelined(runner, prompts: dict[int, list[int]], steps: int, **sampling) -> dict[int, list[int]]:
    """Async scheduling by hand: each step after the first is launched with PLACEHOLDER inputs
    before the step before is read, its rows in the opposite order. Returns the tokens."""
    alloc = MiniAllocator(runner.num_blocks, seed=0)
    toks = {s: list(p) for s, p in prompts.items()}
    order = list(toks)
    pending = runner.launch(make_step(0, alloc, [(s, toks[s], 0) for s in order], **sampling)), order
    for n in range(1, steps):
        order = order[::-1]  # rows need not keep their places
        for s in order:
            toks[s].append(PLACEHOLDER)
        rows = {k: [v[s] for s in order] for k, v in sampling.items()}
        nxt = runner.launch(make_step(n, alloc, [(s, toks[s], len(toks[s]) - 1) for s in order], **rows)), order
        handle, done_order = pending
        for s, t in zip(done_order, handle.result().token_ids.tolist()):
            toks[s][-1] = t
        pending = nxt
    handle, done_order = pending
    for s, t in zip(done_order, handle.result().token_ids.tolist()):
        toks[s].append(t)
    return toks


def run_synchronous(runner, prompts: dict[int, list[int]], steps: int, **sampling) -> dict[int, list[int]]:
    ref = Driver(runner)
    for s, p in prompts.items():
        ref.add(s, p)
    for _ in range(steps):
        ref.step(**sampling)
    return ref.tokens


PROMPTS = {0: [1, 5, 6, 7], 1: [1, 9, 10], 2: [1, 30]}
SAMPLING = dict(temperature=[0.0, 0.9, 0.0], seed=[-1, 77, -1])


def test_a_step_launched_before_the_last_is_read_takes_its_placeholders_from_it(runner):
    """Step n+1 launched with PLACEHOLDER inputs before step n is read gets step n's samples
    (matched by sequence, in any row order): the tokens equal those of synchronous steps,
    greedy and seeded alike."""
    assert run_pipelined(runner, PROMPTS, 6, **SAMPLING) == run_synchronous(runner, PROMPTS, 6, **SAMPLING)


def test_launch_refuses_a_third_unread_step_and_an_unknown_placeholder(runner):
    alloc = MiniAllocator(runner.num_blocks, seed=2)
    a = runner.launch(make_step(0, alloc, [(0, [1, 5], 0)]))
    b = runner.launch(make_step(1, alloc, [(1, [1, 6], 0)]))
    with pytest.raises(RuntimeError, match="unread"):
        runner.launch(make_step(2, alloc, [(2, [1, 7], 0)]))
    a.result(), b.result()
    with pytest.raises(ValueError, match="placeholder input for sequence 0"):
        runner.launch(make_step(3, alloc, [(0, [1, 5, PLACEHOLDER], 2)]))  # step 1 sampled seq 1 only
    assert b.result() is b.result()  # reading twice is harmless
