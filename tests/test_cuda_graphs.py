"""Decode CUDA graphs: buckets, padding of the static inputs (CPU), graphs == eager (CUDA)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_model import Driver, MiniAllocator, make_step
from test_model_runner import run_pipelined, run_synchronous

from engine.config import ModelConfig
from engine.cuda_graphs import StagedInputs, bucket_for, graph_batch_sizes
from engine.model_runner import ModelRunner
from engine.sequence import PLACEHOLDER


def test_bucket_sizes_cover_every_batch_up_to_max_num_seqs():
    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(32) == [1, 2, 4, 8, 16, 24, 32]
    assert graph_batch_sizes(20) == [1, 2, 4, 8, 16, 20]
    sizes = graph_batch_sizes(128)
    assert sizes[-2:] == [120, 128]
    for n in range(1, 129):
        b = bucket_for(n, sizes)
        assert b >= n and (b == sizes[0] or sizes[sizes.index(b) - 1] < n)
    assert bucket_for(129, sizes) is None


def test_staged_inputs_pad_rows_so_they_store_and_read_nothing():
    staged = StagedInputs(max_batch=8, max_blocks=4, device=torch.device("cpu"))
    alloc = MiniAllocator(32, seed=1)
    # a full step of placeholders (async scheduling) in the first host set, then another
    # step in the second: the short step reuses the first set, whose stale rows hold -1
    full = make_step(0, alloc, [(s, [1] * 20 + [PLACEHOLDER], 20) for s in range(4)])
    staged.stage(full, 4)
    staged.stage(make_step(1, alloc, [(s, [1] * 21 + [3], 21) for s in range(4)]), 4)
    short = make_step(2, alloc, [(0, [1] * 21 + [6], 21), (1, [1] * 40 + [7], 40)])
    assert (short.block_tables == -1).any()
    staged.stage(short, 4)
    d = staged.dev
    np.testing.assert_array_equal(d["input_ids"][:4].numpy(), [6, 7, 0, 0])  # padding: a valid token
    np.testing.assert_array_equal(d["positions"][:4].numpy(), [21, 40, 0, 0])
    np.testing.assert_array_equal(d["slot_mapping"][:4].numpy(), list(short.slot_mapping) + [-1, -1])
    np.testing.assert_array_equal(d["context_lens"][:4].numpy(), [22, 41, 0, 0])
    np.testing.assert_array_equal(d["block_tables"][:2, :3].numpy(), np.maximum(short.block_tables, 0))
    meta = staged.metadata(4, 64)
    assert (meta.num_seqs, meta.max_context_len, meta.is_prefill) == (4, 64, False)
    np.testing.assert_array_equal(meta.query_start_loc.numpy(), [0, 1, 2, 3, 4])
    wide = make_step(3, alloc, [(9, [1] * 80 + [2], 80)])
    with pytest.raises(ValueError, match="captured for 4"):
        staged.stage(wide, 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("num_seqs", [1, 5, 8])
def test_greedy_tokens_with_graphs_equal_eager(num_seqs):
    """float32 tiny model: a padded bucket (5 -> 8) and exact buckets decode the same tokens."""
    cfg = ModelConfig(preset="tiny", dtype="float32", device="cuda", seed=0)
    runs = []
    for graphs in (False, True):
        runner = ModelRunner(cfg, block_size=16, num_blocks=128, cuda_graphs=graphs, max_num_seqs=8, max_model_len=256)
        assert (runner.graphs is not None) == graphs
        d = Driver(runner, seed=3)
        rng = np.random.default_rng(num_seqs)
        for s in range(num_seqs):
            d.add(s, [1] + rng.integers(3, 8000, size=int(rng.integers(5, 60))).tolist())
        for _ in range(24):
            d.step()
        runs.append(d.tokens)
    assert runs[0] == runs[1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_pipelined_graph_steps_take_their_placeholders_on_the_device():
    """With graphs, a step launched before the last is read fills its PLACEHOLDER inputs on
    the device (staged through the other set of pinned buffers): same tokens as one step at a time."""
    cfg = ModelConfig(preset="tiny", dtype="float32", device="cuda", seed=0)
    runner = ModelRunner(cfg, block_size=16, num_blocks=128, cuda_graphs=True, max_num_seqs=8, max_model_len=256)
    prompts = {s: [1] + list(range(100 + 7 * s, 140 + 9 * s)) for s in range(5)}
    sampling = dict(temperature=[0.0, 0.8, 0.0, 1.0, 0.0], seed=[-1, 5, -1, 9, -1])
    assert run_pipelined(runner, prompts, 24, **sampling) == run_synchronous(runner, prompts, 24, **sampling)
