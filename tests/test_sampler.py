"""Sampler: greedy, top-k/top-p filtering, per-request seeds, logprobs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.sampler import Sampler, SamplingTensors

V = 50


def params(b, temperature=1.0, top_p=1.0, top_k=0, seed=-1, positions=None, banned=(), top_logprobs=0):
    arr = lambda v, dt: np.broadcast_to(np.asarray(v, dt), (b,)).copy()  # noqa: E731
    return SamplingTensors.from_numpy(
        arr(temperature, np.float32),
        arr(top_p, np.float32),
        arr(top_k, np.int32),
        arr(seed, np.int64),
        arr(0 if positions is None else positions, np.int32),
        torch.device("cpu"),
        banned=banned,
        top_logprobs=top_logprobs,
    )


@pytest.fixture
def logits():
    return torch.randn(6, V, generator=torch.Generator().manual_seed(0)) * 3


def test_greedy_is_argmax_with_model_logprob(logits):
    ids, lp, *_ = Sampler("cpu")(logits, params(6, temperature=0.0))
    assert torch.equal(ids, logits.argmax(-1))
    torch.testing.assert_close(lp, torch.log_softmax(logits, -1).max(-1).values)
    assert params(6, temperature=0.0).all_greedy


def test_the_most_likely_tokens_come_with_their_model_logprobs_whatever_was_sampled(logits):
    got = Sampler("cpu", seed=3)(logits, params(6, temperature=1.5, top_k=5, top_logprobs=4))
    model = torch.log_softmax(logits, -1)
    torch.testing.assert_close(got.top_logprobs, model.topk(4, dim=-1).values)  # before temperature and top-k
    assert torch.equal(got.top_ids, model.topk(4, dim=-1).indices)
    torch.testing.assert_close(got.logprobs, model.gather(1, got.ids[:, None]).squeeze(1))
    none = Sampler("cpu")(logits, params(6))
    assert none.top_ids.shape == none.top_logprobs.shape == (6, 0)


def test_top_k_1_or_tiny_top_p_equals_greedy_at_any_temperature(logits):
    ids, *_ = Sampler("cpu", seed=5)(logits, params(6, temperature=2.0, top_k=1))
    assert torch.equal(ids, logits.argmax(-1))
    ids, *_ = Sampler("cpu", seed=5)(logits, params(6, temperature=2.0, top_p=1e-6))
    assert torch.equal(ids, logits.argmax(-1))


def test_mixed_greedy_and_sampled_rows(logits):
    st = params(6, temperature=[0, 1, 0, 1, 0, 1])
    ids, lp, *_ = Sampler("cpu")(logits, st)
    assert torch.equal(ids[::2], logits[::2].argmax(-1))
    torch.testing.assert_close(lp, torch.log_softmax(logits, -1).gather(1, ids[:, None]).squeeze(1))


def test_seeded_rows_reproduce_regardless_of_batch(logits):
    """A seeded row's draw depends on (seed, position) only: not on batch order, neighbours or sampler state."""
    seeds = [11, 11, 12, -1, 13, 11]
    positions = [5, 5, 5, 5, 5, 6]
    a, *_ = Sampler("cpu", seed=0)(logits, params(6, seed=seeds, positions=positions))
    perm = [5, 4, 3, 2, 1, 0]
    permuted = params(6, seed=np.array(seeds)[perm], positions=np.array(positions)[perm])
    b, *_ = Sampler("cpu", seed=99)(logits[perm], permuted)
    for i, j in enumerate(perm):
        if seeds[j] >= 0:
            assert b[i] == a[j]
    # Same logits, same seed, same position -> same token; a different position redraws.
    same_row = torch.stack([logits[0]] * 40)
    draws, *_ = Sampler("cpu")(same_row, params(40, seed=11, positions=5))
    assert (draws == draws[0]).all()
    moved, *_ = Sampler("cpu")(same_row, params(40, seed=11, positions=np.arange(40)))
    assert len(set(moved.tolist())) > 1


def test_banned_tokens_are_never_chosen(logits):
    """min_tokens: a row's banned tokens (EOS, stop tokens) are not candidates, greedy or
    sampled, even as the argmax; other rows are untouched."""
    top = logits.argmax(-1)
    banned = ((0, (int(top[0]),)), (1, (int(top[1]), 3)))
    ids, lp, *_ = Sampler("cpu")(logits, params(6, temperature=0.0, banned=banned))
    assert ids[0] != top[0] and ids[1] not in (top[1], 3) and torch.equal(ids[2:], top[2:])
    assert torch.isfinite(lp).all()
    hot = torch.full((50, V), -10.0)
    hot[:, 7] = 10.0  # token 7 is all but certain
    ids, *_ = Sampler("cpu", seed=1)(hot, params(50, banned=tuple((r, (7,)) for r in range(50))))
    assert 7 not in ids.tolist()


def test_unseeded_rows_vary(logits):
    flat = torch.zeros(200, V)
    ids, *_ = Sampler("cpu")(flat, params(200))
    assert len(set(ids.tolist())) > 20


def test_top_p_samples_only_the_nucleus():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(4000, 4).contiguous()
    ids, *_ = Sampler("cpu")(logits, params(4000, top_p=0.7))
    # Nucleus for p=0.7: {0, 1} (mass before token 2 is 0.8 >= 0.7); renormalised 0.625 / 0.375.
    counts = torch.bincount(ids, minlength=4).float() / 4000
    assert counts[2:].sum() == 0
    assert abs(counts[0] - 0.625) < 0.04


def test_top_k_and_temperature_frequencies():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0]).expand(6000, 4).contiguous()
    ids, *_ = Sampler("cpu")(logits, params(6000, top_k=2, temperature=0.5))
    counts = torch.bincount(ids, minlength=4).float() / 6000
    expected = torch.softmax(torch.tensor([4.0, 2.0]), 0)
    assert counts[2:].sum() == 0
    assert abs(counts[0] - expected[0]) < 0.03
