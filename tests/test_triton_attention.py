"""Triton paged attention against a naive float32 reference and the torch_ref backend.

The kernels need CUDA; on a CPU machine only the import check runs.
"""

from __future__ import annotations

import math

import pytest
import torch

from engine.attention import torch_ref
from engine.attention import triton as backend
from engine.attention.metadata import AttentionMetadata

cuda = pytest.mark.skipif(not (torch.cuda.is_available() and backend.AVAILABLE), reason="needs CUDA and triton")
BF16, FP16 = torch.bfloat16, torch.float16
# Largest per-token relative error: bf16 rounds p and the output to 8 bits, fp16 to 11.
TOL = {BF16: 2e-2, FP16: 4e-3}
DEVICE = "cuda"


def test_module_imports_without_cuda():
    assert isinstance(backend.AVAILABLE, bool)
    assert callable(backend.attention) and callable(backend.store_kv)


def _batch(ctx_lens, q_lens, block_size, heads, kv_heads, dim, dtype, is_prefill, gen, num_blocks=None):
    """A random paged cache holding each sequence's prefix, the new tokens' q/k/v, and metadata."""
    dev = DEVICE
    n_blocks = [math.ceil(c / block_size) for c in ctx_lens]
    num_blocks = num_blocks or sum(n_blocks) + 2
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    block_tables = torch.zeros(len(ctx_lens), max(max(n_blocks), 1), dtype=torch.int32)
    slots = []
    for b, (c, n) in enumerate(zip(ctx_lens, q_lens)):
        block_tables[b, : n_blocks[b]] = torch.tensor(perm[: n_blocks[b]], dtype=torch.int32)
        perm = perm[n_blocks[b] :]
        pos = torch.arange(c - n, c)
        slots.append(block_tables[b, pos // block_size].long() * block_size + pos % block_size)
    shape = (num_blocks, block_size, kv_heads, dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    t = sum(q_lens)
    q = torch.randn(t, heads, dim, generator=gen).to(dtype)
    k = torch.randn(t, kv_heads, dim, generator=gen).to(dtype)
    v = torch.randn(t, kv_heads, dim, generator=gen).to(dtype)
    qsl = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
    qsl[1:] = torch.tensor(q_lens).cumsum(0)
    meta = AttentionMetadata(
        is_prefill=is_prefill,
        slot_mapping=torch.cat(slots).to(dev),
        block_tables=block_tables.to(dev),
        context_lens=torch.tensor(ctx_lens, dtype=torch.int32, device=dev),
        query_start_loc=qsl.to(dev),
        max_query_len=max(q_lens),
        max_context_len=max(ctx_lens),
    )
    return [x.to(dev) for x in (q, k, v, k_cache, v_cache)], meta


def _reference(q, k_cache, v_cache, meta):
    """Per sequence, in float32: gather its K/V through the block table, causal softmax."""
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = q.shape[1] // kv_heads
    scale = q.shape[2] ** -0.5
    qsl, ctx = meta.query_start_loc.tolist(), meta.context_lens.tolist()
    out = torch.zeros_like(q, dtype=torch.float32)
    for b, c in enumerate(ctx):
        lo, hi = qsl[b], qsl[b + 1]
        pos = torch.arange(c, device=q.device)
        blocks = meta.block_tables[b, pos // block_size].long()
        k = k_cache[blocks, pos % block_size].float().repeat_interleave(group, 1)  # [c, H, D]
        v = v_cache[blocks, pos % block_size].float().repeat_interleave(group, 1)
        s = torch.einsum("nhd,chd->hnc", q[lo:hi].float(), k) * scale
        q_pos = c - (hi - lo) + torch.arange(hi - lo, device=q.device)
        s.masked_fill_(pos[None, None, :] > q_pos[None, :, None], float("-inf"))
        out[lo:hi] = torch.einsum("hnc,chd->nhd", s.softmax(-1), v)
    return out


def _max_row_error(out, ref):
    out, ref = out.float().flatten(1), ref.flatten(1)
    assert torch.isfinite(out).all()
    return ((out - ref).norm(dim=1) / ref.norm(dim=1).clamp_min(1e-6)).max().item()


def _run_and_check(ctx_lens, q_lens, block_size, heads, kv_heads, dim, dtype, is_prefill, seed):
    gen = torch.Generator().manual_seed(seed)
    (q, k, v, k_cache, v_cache), meta = _batch(
        ctx_lens, q_lens, block_size, heads, kv_heads, dim, dtype, is_prefill, gen
    )
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    torch_ref.store_kv(k, v, ref_k, ref_v, meta.slot_mapping)
    backend.store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)
    out = backend.attention(q, k_cache, v_cache, meta, dim**-0.5)
    assert out.shape == q.shape and out.dtype == dtype
    assert _max_row_error(out, _reference(q, k_cache, v_cache, meta)) < TOL[dtype]
    ref_out = torch_ref.attention(q, k_cache, v_cache, meta, dim**-0.5)
    assert _max_row_error(out, ref_out.float()) < 2 * TOL[dtype]


def _lens(batch, max_ctx, gen):
    """Random context lengths in [1, max_ctx], the longest exactly max_ctx."""
    lens = torch.randint(1, max_ctx + 1, (batch,), generator=gen).tolist()
    lens[0] = max_ctx
    return lens


# (batch, max_context, block_size, heads, kv_heads, head_dim, dtype): GQA ratios 1/4/8.
DECODE_CASES = [
    (1, 1, 16, 8, 8, 64, BF16),
    (3, 17, 16, 32, 8, 128, FP16),
    (64, 300, 32, 32, 4, 128, BF16),
    (8, 4096, 16, 32, 32, 128, BF16),
    (2, 4096, 32, 32, 4, 64, FP16),
    (16, 1000, 16, 16, 2, 128, BF16),
    (1, 4096, 16, 64, 8, 128, BF16),
    (64, 2048, 32, 8, 1, 64, FP16),
    (33, 777, 32, 32, 32, 64, FP16),
]


@cuda
@pytest.mark.parametrize("batch,max_ctx,block_size,heads,kv_heads,dim,dtype", DECODE_CASES)
def test_decode_matches_reference(batch, max_ctx, block_size, heads, kv_heads, dim, dtype):
    gen = torch.Generator().manual_seed(batch * 7919 + max_ctx)
    ctx = _lens(batch, max_ctx, gen)
    _run_and_check(ctx, [1] * batch, block_size, heads, kv_heads, dim, dtype, False, seed=max_ctx)


# (batch, max_new_tokens, max_prefix, block_size, heads, kv_heads, head_dim, dtype)
PREFILL_CASES = [
    (1, 1, 0, 16, 8, 8, 64, BF16),
    (1, 1000, 0, 32, 32, 8, 128, BF16),
    (1, 100, 700, 16, 32, 32, 128, FP16),
    (4, 200, 0, 16, 32, 32, 128, BF16),
    (3, 130, 500, 32, 32, 8, 128, FP16),
    (2, 64, 4000, 16, 32, 4, 128, BF16),
    (8, 257, 257, 32, 16, 2, 64, FP16),
    (5, 100, 1000, 16, 64, 8, 128, BF16),
]


@cuda
@pytest.mark.parametrize("batch,max_new,max_prefix,block_size,heads,kv_heads,dim,dtype", PREFILL_CASES)
def test_prefill_matches_reference(batch, max_new, max_prefix, block_size, heads, kv_heads, dim, dtype):
    gen = torch.Generator().manual_seed(batch * 31 + max_new + max_prefix)
    new = _lens(batch, max_new, gen)
    prefix = [max_prefix] + torch.randint(0, max_prefix + 1, (batch - 1,), generator=gen).tolist()
    ctx = [p + n for p, n in zip(prefix, new)]
    _run_and_check(ctx, new, block_size, heads, kv_heads, dim, dtype, True, seed=batch + max_new)


@cuda
def test_store_kv_skips_negative_slots():
    gen = torch.Generator().manual_seed(0)
    (_, k, v, k_cache, v_cache), meta = _batch([40, 9], [40, 9], 16, 8, 8, 64, BF16, True, gen)
    slots = meta.slot_mapping.clone()
    slots[::3] = -1
    before_k, before_v = k_cache.clone(), v_cache.clone()
    backend.store_kv(k, v, k_cache, v_cache, slots)
    keep = slots >= 0
    torch_ref.store_kv(k[keep], v[keep], before_k, before_v, slots[keep])
    assert torch.equal(k_cache, before_k) and torch.equal(v_cache, before_v)


@cuda
def test_decode_replays_in_cuda_graph():
    """Captured once at a fixed max_context_len, replayed on new contexts and block tables,
    with a padding row (slot -1, context 0) that must come out as zeros."""
    batch, heads, kv_heads, dim, bs, max_ctx = 6, 32, 8, 128, 16, 2048
    num_blocks = batch * max_ctx // bs
    gen = torch.Generator().manual_seed(1)
    ctx = _lens(batch - 1, max_ctx, gen) + [1]
    (q, k, v, k_cache, v_cache), meta = _batch(ctx, [1] * batch, bs, heads, kv_heads, dim, BF16, False, gen, num_blocks)
    meta.context_lens[-1] = 0
    meta.slot_mapping[-1] = -1
    scale = dim**-0.5

    def step():
        backend.store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        return backend.attention(q, k_cache, v_cache, meta, scale)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()

    for seed in (2, 3):
        g2 = torch.Generator().manual_seed(seed)
        new_ctx = _lens(batch - 1, max_ctx, g2) + [1]
        new, m2 = _batch(new_ctx, [1] * batch, bs, heads, kv_heads, dim, BF16, False, g2, num_blocks)
        for dst, src in (
            *zip((q, k, v, k_cache, v_cache), new),
            (meta.block_tables, m2.block_tables),
            (meta.context_lens, m2.context_lens),
            (meta.slot_mapping, m2.slot_mapping),
        ):
            dst.copy_(src)
        meta.context_lens[-1] = 0
        meta.slot_mapping[-1] = -1
        graph.replay()
        torch.cuda.synchronize()
        ref = _reference(q[:-1], k_cache, v_cache, _live_rows(meta, batch - 1))
        assert _max_row_error(out[:-1], ref) < TOL[BF16]
        assert torch.equal(out[-1], torch.zeros_like(out[-1]))


def _live_rows(meta, n):
    """The metadata of the first n decode sequences."""
    return AttentionMetadata(
        False,
        meta.slot_mapping[:n],
        meta.block_tables[:n],
        meta.context_lens[:n],
        meta.query_start_loc[: n + 1],
        1,
        meta.max_context_len,
    )
