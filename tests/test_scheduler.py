"""Scheduler: continuous batching, budgets, preemption by recompute, aborts, stop rules, and a
long randomized simulation that must leave every KV block free."""

import random
import time
import zlib
from collections import deque

import pytest

import llmtrace
from engine.block_manager import BlockManager
from engine.config import ConfigError, EngineConfig
from engine.executor import token_ids as _token_ids
from engine.sampling_params import SamplingParams
from engine.scheduler import QueueFull, RequestRejected, Scheduler
from engine.sequence import PLACEHOLDER, Sequence, SequenceStatus

EOS = 2


def make(num_blocks=64, block_size=4, eos=EOS, prefill_batch_1=False, **engine):
    engine.setdefault("max_model_len", 64)
    engine.setdefault("max_batched_tokens", 256)
    cfg = EngineConfig(block_size=block_size, num_blocks=num_blocks, **engine)
    return Scheduler(cfg, BlockManager(num_blocks, block_size), eos, prefill_batch_1=prefill_batch_1)


def seq(req, n, max_tokens=16, **params):
    return Sequence(req, range(10, 10 + n), SamplingParams(max_tokens=max_tokens, **params))


def step(sched, token=7):
    """One engine step with every sequence sampling `token`; returns (output, finished)."""
    out = sched.schedule()
    finished = sched.postprocess(out, [token] * len(out.scheduled))
    sched.check_invariants()
    return out, finished


def test_prefill_batches_several_requests_then_decodes():
    sched = make()
    seqs = [seq(f"r{i}", n) for i, n in enumerate((5, 6, 7))]
    for s in seqs:
        sched.add(s)
    assert sched.num_waiting == 3 and sched.has_unfinished()
    out = sched.schedule()
    assert out.is_prefill and out.preempted == []
    got = [(s.seq, s.num_new_tokens, s.start_pos) for s in out.scheduled]
    assert got == [(seqs[0], 5, 0), (seqs[1], 6, 0), (seqs[2], 7, 0)]
    assert out.num_batched_tokens == 18
    assert all(s.first_scheduled_ns >= s.arrival_ns and s.status is SequenceStatus.RUNNING for s in seqs)
    assert sched.postprocess(out, [7, 8, 9]) == []
    assert [s.output_token_ids for s in seqs] == [[7], [8], [9]]
    assert [s.num_cached_tokens for s in seqs] == [5, 6, 7]
    assert seqs[0].all_token_ids == [10, 11, 12, 13, 14, 7] and seqs[0].last_token_id == 7
    assert seqs[0].num_tokens == 6 and seqs[0].num_blocks_needed(4) == 2
    assert all(s.first_token_ns >= s.first_scheduled_ns for s in seqs)
    out = sched.schedule()
    assert not out.is_prefill
    got = [(s.seq, s.num_new_tokens, s.start_pos) for s in out.scheduled]
    assert got == [(seqs[0], 1, 5), (seqs[1], 1, 6), (seqs[2], 1, 7)]
    sched.check_invariants()


def test_new_requests_join_the_running_batch():
    sched = make()
    a, b = seq("a", 4), seq("b", 4)
    sched.add(a)
    step(sched)
    step(sched)
    sched.add(b)
    out, _ = step(sched)
    assert out.is_prefill and [s.seq for s in out.scheduled] == [b]  # prefill first, a waits one step
    out, _ = step(sched)
    assert not out.is_prefill and [s.seq for s in out.scheduled] == [a, b]
    assert a.num_output_tokens == 3 and b.num_output_tokens == 2


@pytest.mark.parametrize(
    "prefill_batch_size, prefill_batch_1, sizes", [(2, False, [2, 2, 1]), (8, True, [1, 1, 1, 1, 1])]
)
def test_prefill_batch_size_and_the_batch_1_antipattern(prefill_batch_size, prefill_batch_1, sizes):
    sched = make(prefill_batch_size=prefill_batch_size, prefill_batch_1=prefill_batch_1)
    for i in range(5):
        sched.add(seq(f"r{i}", 3))
    got = []
    while sched.num_waiting:
        out, _ = step(sched)
        assert out.is_prefill
        got.append(len(out.scheduled))
    assert got == sizes


def test_token_budget_is_respected():
    sched = make(max_model_len=16, max_batched_tokens=16)
    for i in range(3):
        sched.add(seq(f"r{i}", 6))
    sched.add(seq("r3", 16))
    budgets = []
    while sched.num_waiting:
        out, _ = step(sched)
        assert out.num_batched_tokens <= 16
        if out.is_prefill:
            budgets.append([s.num_new_tokens for s in out.scheduled])
    assert budgets == [[6, 6], [6], [16]]


def test_max_num_seqs_caps_the_running_batch():
    sched = make(max_num_seqs=2)
    for i in range(3):
        sched.add(seq(f"r{i}", 3, max_tokens=3))
    out, _ = step(sched)
    assert len(out.scheduled) == 2 and sched.num_running == 2 and sched.num_waiting == 1
    out, _ = step(sched)
    assert not out.is_prefill and len(out.scheduled) == 2
    step(sched)  # both reach max_tokens
    assert sched.num_running == 0
    out, _ = step(sched)
    assert out.is_prefill and out.scheduled[0].seq.req_id == "r2"


def test_preemption_by_recompute_and_resume(monkeypatch):
    instants = []
    monkeypatch.setattr(llmtrace, "instant", lambda name, **attrs: instants.append((name, attrs)))
    # 4 blocks of 4 tokens: two 8-token prompts fill the cache.
    sched = make(num_blocks=4, block_size=4, max_model_len=16, max_batched_tokens=16)
    a, b = seq("a", 8, max_tokens=4), seq("b", 8, max_tokens=4)
    sched.add(a)
    sched.add(b)
    out, _ = step(sched, token=5)
    assert len(out.scheduled) == 2 and sched.block_manager.num_free_blocks == 0
    # Both need a 3rd block for their 9th token: the newest (b) gives its blocks up.
    out, _ = step(sched, token=6)
    assert out.preempted == [b] and [s.seq for s in out.scheduled] == [a]
    assert b.status is SequenceStatus.WAITING and b.num_preemptions == 1 and b.num_cached_tokens == 0
    assert b.block_table == [] and list(sched.waiting) == [b] and sched.num_preemptions == 1
    assert instants == [("preempt", {"req": "b"})]
    first_scheduled = b.first_scheduled_ns
    while not a.is_finished:
        out, _ = step(sched, token=6)
        assert [s.seq for s in out.scheduled] == [a]
    assert a.finish_reason == "length" and a.output_token_ids == [5, 6, 6, 6]
    # b is recomputed in one prefill: its prompt and the token it had generated.
    out, _ = step(sched, token=8)
    assert out.is_prefill and [(s.seq, s.num_new_tokens, s.start_pos) for s in out.scheduled] == [(b, 9, 0)]
    assert b.first_scheduled_ns == first_scheduled  # the queue span ends at the first scheduling
    while sched.has_unfinished():
        step(sched, token=9)
    assert b.finish_reason == "length" and b.output_token_ids == [5, 8, 9, 9]
    assert sched.block_manager.num_free_blocks == 4


def test_the_only_running_sequence_never_preempts_itself_out():
    sched = make(num_blocks=4, block_size=4, max_model_len=16, max_batched_tokens=16)
    s = seq("a", 3, max_tokens=100)
    sched.add(s)
    while sched.has_unfinished():
        out, _ = step(sched)
        assert out.preempted == []
    assert s.finish_reason == "length" and s.num_tokens == 16


def test_abort_frees_blocks_wherever_the_sequence_is():
    sched = make(max_num_seqs=1)
    running, waiting = seq("run", 9), seq("wait", 5)
    sched.add(running)
    sched.add(waiting)
    step(sched)
    assert running.block_table and sched.block_manager.num_used_blocks == 3
    assert sched.abort("wait") is waiting and waiting.finish_reason == "abort" and sched.num_waiting == 0
    assert sched.abort("run") is running and running.block_table == [] and sched.num_running == 0
    assert sched.block_manager.num_used_blocks == 0 and not sched.has_unfinished()
    assert sched.abort("run") is None and sched.abort("never") is None
    sched.check_invariants()


def test_abort_while_the_step_runs():
    sched = make()
    a, b = seq("a", 4), seq("b", 4)
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    sched.abort("a")
    assert sched.postprocess(out, [7, 7]) == []
    assert a.output_token_ids == [] and a.status is SequenceStatus.FINISHED_ABORTED
    assert b.output_token_ids == [7]
    sched.check_invariants()


@pytest.mark.parametrize(
    "params, tokens, reason, n_out",
    [
        ({}, [7, 7, EOS, 7], "stop", 3),
        ({"ignore_eos": True}, [7, EOS, EOS, EOS, 7, 7], "length", 6),
        ({"stop_token_ids": [9]}, [7, 9, 7], "stop", 2),
        ({"ignore_eos": True, "stop_token_ids": [EOS]}, [7, EOS, 7], "stop", 2),
        ({}, [7] * 10, "length", 6),  # max_tokens
        ({"max_tokens": 100}, [7] * 100, "length", 60),  # max_model_len (64) with a 4-token prompt
    ],
)
def test_stop_conditions(params, tokens, reason, n_out):
    sched = make()
    s = seq("r", 4, **{"max_tokens": 6, **params})
    sched.add(s)
    finished = []
    for token in tokens:
        _, finished = step(sched, token)
        if finished:
            break
    assert finished == [s] and s.finish_reason == reason and s.num_output_tokens == n_out
    assert s.block_table == [] and sched.block_manager.num_used_blocks == 0 and not sched.has_unfinished()


def test_add_rejects_what_cannot_run():
    sched = make(max_model_len=32, max_batched_tokens=32, max_waiting=2)
    with pytest.raises(RequestRejected, match="the prompt has 33 tokens, more than the 32"):
        sched.add(seq("long", 33))
    with pytest.raises(RequestRejected, match="the prompt is empty"):
        sched.add(seq("empty", 0))
    sched.add(seq("a", 4))
    with pytest.raises(RequestRejected, match="request id 'a' is already in use"):
        sched.add(seq("a", 4))
    sched.add(seq("b", 4))
    with pytest.raises(QueueFull, match="2 requests are waiting already"):
        sched.add(seq("c", 4))
    assert sched.num_waiting == 2


def test_kv_cache_smaller_than_max_model_len_is_a_config_error():
    with pytest.raises(ConfigError, match=r"engine\.max_model_len: 64 exceeds the KV cache capacity of 32 tokens"):
        make(num_blocks=8, block_size=4, max_model_len=64)


def test_randomized_simulation_leaves_every_block_free():
    """2,000 requests with random arrivals, lengths, EOS and aborts on a small KV cache."""
    rng = random.Random(1234)
    sched = make(
        num_blocks=48,
        block_size=8,
        max_num_seqs=16,
        max_batched_tokens=128,
        prefill_batch_size=4,
        max_model_len=128,
        max_waiting=32,
    )
    cfg, bm = sched.cfg, sched.block_manager
    pending = [
        seq(f"r{i}", rng.randint(1, 100), max_tokens=rng.randint(1, 60), ignore_eos=rng.random() < 0.5)
        for i in range(2000)
    ]
    pending.reverse()
    ended: dict[str, Sequence] = {}
    deadline = time.monotonic() + 20

    def abort_random():
        if live and rng.random() < 0.05:
            req_id = live.pop(rng.randrange(len(live)))
            ended[req_id] = sched.abort(req_id)
            assert ended[req_id].finish_reason == "abort"

    live: list[str] = []  # added and not yet seen to end, in our own bookkeeping
    steps = rejected = 0
    while pending or sched.has_unfinished():
        assert time.monotonic() < deadline, "simulation too slow or stuck"
        for _ in range(rng.choice((0, 0, 0, 0, 1, 3))):  # bursts fill the bounded waiting queue
            if pending:
                try:
                    sched.add(pending[-1])
                    live.append(pending.pop().req_id)
                except QueueFull:
                    rejected += 1
        abort_random()
        out = sched.schedule()
        assert out.num_batched_tokens <= cfg.max_batched_tokens and len(out.scheduled) <= cfg.max_num_seqs
        if out.is_prefill:
            assert len(out.scheduled) <= cfg.prefill_batch_size
        for s, n, start in out.scheduled:
            # each step computes every token not yet in the cache, within the sequence's blocks
            assert start == s.num_cached_tokens and start + n == s.num_tokens
            assert len(s.block_table) * bm.block_size >= s.num_tokens
        abort_random()  # while the step "runs"
        tokens = [EOS if rng.random() < 0.02 else rng.randint(3, 999) for _ in out.scheduled]
        for s in sched.postprocess(out, tokens):
            assert s.req_id not in ended
            ended[s.req_id] = s
            live.remove(s.req_id)
        steps += 1
        if steps % 10 == 0:
            sched.check_invariants()
    sched.check_invariants()
    assert bm.num_free_blocks == bm.num_blocks and sched.num_running == sched.num_waiting == 0
    assert len(ended) == 2000
    assert sched.num_preemptions > 0  # the cache is small enough to exercise recompute
    assert rejected > 0  # and arrivals outrun the engine at times
    assert any(s.num_preemptions and s.finish_reason != "abort" for s in ended.values())
    for s in ended.values():
        p = s.sampling_params
        assert s.block_table == []
        if s.finish_reason == "length":
            assert s.num_output_tokens == p.max_tokens or s.num_tokens >= cfg.max_model_len
        elif s.finish_reason == "stop":
            assert s.output_token_ids[-1] == EOS and not p.ignore_eos and s.num_output_tokens <= p.max_tokens
        else:
            assert s.finish_reason == "abort" and s.num_output_tokens < p.max_tokens


def _model(req_id: str, pos: int) -> int:
    """A deterministic 'model': the token a request samples for position `pos`."""
    h = zlib.crc32(f"{req_id}:{pos}".encode())
    return EOS if h % 50 == 0 else 3 + h % 996


def _serve(async_scheduling: bool, seed: int, aborts: bool) -> tuple[dict[str, Sequence], Scheduler]:
    """The master's loop over a simulated agent: with async scheduling, step n+1 is scheduled
    and 'launched' before step n is postprocessed. The agent fills placeholder inputs from its
    own previous samples, and every input token is checked against what the model sampled
    for that position."""
    rng = random.Random(seed)
    sched = make(
        num_blocks=40,
        block_size=8,
        max_num_seqs=12,
        max_batched_tokens=128,
        prefill_batch_size=4,
        max_model_len=128,
        max_waiting=16,
    )
    pending = [
        seq(f"r{i}", rng.randint(1, 90), max_tokens=rng.randint(1, 50), ignore_eos=rng.random() < 0.3)
        for i in range(400)
    ]
    pending.reverse()
    ended: dict[str, Sequence] = {}
    in_flight: deque = deque()
    last: dict[int, int] = {}  # the agent's samples of the step launched last

    def launch(out):
        nonlocal last
        tokens = []
        for s, n, start in out.scheduled:
            ids = _token_ids(s, start, n)
            assert PLACEHOLDER not in ids[:-1]  # only the newest token can be in flight
            if ids[-1] == PLACEHOLDER:
                ids[-1] = last[s.seq_id]
            for p, t in enumerate(ids, start):
                assert p < s.num_prompt_tokens or t == _model(s.req_id, p), (s, p)
            tokens.append(_model(s.req_id, start + n))
        last = {s.seq.seq_id: t for s, t in zip(out.scheduled, tokens)}
        in_flight.append((out, tokens))

    while pending or sched.has_unfinished() or in_flight:
        for _ in range(rng.choice((0, 0, 1, 3))):
            if pending:
                try:
                    sched.add(pending[-1])
                    pending.pop()
                except QueueFull:
                    pass
        if not in_flight:
            out = sched.schedule()
            if out.is_empty:
                continue
            launch(out)
        if async_scheduling:
            ahead = sched.schedule_ahead(in_flight[-1][0])
            if ahead is not None:
                launch(ahead)
        if aborts and rng.random() < 0.03 and sched.num_running:
            victim = rng.choice(list(sched.running))
            ended[victim.req_id] = sched.abort(victim.req_id)
        out, tokens = in_flight.popleft()
        for s in sched.postprocess(out, tokens):
            ended[s.req_id] = s
        sched.check_invariants()
    return ended, sched


@pytest.mark.parametrize("seed", [0, 1])
def test_async_scheduling_generates_what_sync_scheduling_does(seed):
    """Same requests, outputs and finish reasons with and without scheduling ahead, through
    EOS finishes, length finishes and preemption by recompute."""
    sync, s1 = _serve(False, seed, aborts=False)
    ahead, s2 = _serve(True, seed, aborts=False)
    assert len(sync) == len(ahead) == 400
    for req_id, s in sync.items():
        assert (ahead[req_id].output_token_ids, ahead[req_id].finish_reason) == (s.output_token_ids, s.finish_reason)
    assert s1.num_preemptions > 0 and s2.num_preemptions > 0
    assert any(s.finish_reason == "stop" for s in ahead.values())
    assert s2.block_manager.num_free_blocks == s2.block_manager.num_blocks


def test_async_scheduling_with_aborts_leaves_every_block_free():
    ended, sched = _serve(True, 7, aborts=True)
    bm = sched.block_manager
    assert bm.num_free_blocks == bm.num_blocks and not sched.has_unfinished()
    assert any(s.finish_reason == "abort" for s in ended.values())
    assert all(PLACEHOLDER not in s.output_token_ids for s in ended.values())


def test_schedule_ahead_skips_length_finishes_and_never_preempts():
    sched = make(num_blocks=4, block_size=4, max_model_len=16)
    a, b = seq("a", 4, max_tokens=1), seq("b", 3, max_tokens=8)
    sched.add(a)
    sched.add(b)
    prefill = sched.schedule()
    ahead = sched.schedule_ahead(prefill)  # a's first token is its last: only b decodes
    assert [(s.seq, s.start_pos) for s in ahead.scheduled] == [(b, 3)]
    assert b.output_token_ids == [PLACEHOLDER] and a.output_token_ids == []
    sched.postprocess(prefill, [7, 8])
    assert a.finish_reason == "length" and b.output_token_ids == [8]
    sched.postprocess(ahead, [9])
    assert b.output_token_ids == [8, 9]
    full = make(num_blocks=3, block_size=4, max_model_len=12)
    b, c = seq("b", 4), seq("c", 8)  # fill the cache: their next tokens need blocks nobody has
    full.add(b)
    full.add(c)
    prefill = full.schedule()
    assert full.schedule_ahead(prefill) is None  # a sync schedule after postprocess preempts instead
    assert full.num_preemptions == 0 and b.output_token_ids == c.output_token_ids == []
