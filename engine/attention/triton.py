"""Triton paged attention (the CUDA backend): KV-cache store and one paged attention kernel.

One kernel serves prefill and decode. A program owns one sequence, one KV head and a tile
of query tokens, and stacks every query head of the GQA group into the rows of its Q tile,
so each K/V tile is loaded once per group. Keys are read through the block table and
masked causally (a query at position p sees positions <= p), so a cached prefix needs no
separate path. When the batch alone would not fill the GPU (decode, short prefills over
a long prefix), the keys are split across programs (flash-decoding): each split writes a
partial output with its log-sum-exp and a reduce kernel merges them. A single prompt with
no cached prefix goes to SDPA's flash kernel instead.

Grids depend only on host ints (token count, batch size, max_query_len, max_context_len)
and nothing reads a device value on the host, so decode can be captured in a CUDA graph
when the runner captures with fixed shapes and a fixed max_context_len. Padded rows of
a captured batch are harmless: slots < 0 are not stored and a sequence with
context_lens == 0 gets a zero output.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .metadata import AttentionMetadata

try:
    import triton
    import triton.language as tl

    _jit = triton.jit
except ImportError:  # CPU-only installs: the module imports, the launchers refuse to run.
    triton = tl = None

    def _jit(fn):
        return fn


AVAILABLE = triton is not None


class _Config(NamedTuple):
    block_n: int  # keys per loop iteration
    num_warps: int
    num_stages: int


_LOG2E = 1.4426950408889634
_PREFILL_ROWS = 128  # Q-tile rows (query tokens x group heads) per prefill program
_PREFILL = _Config(block_n=32, num_warps=8, num_stages=2)
_DECODE = _Config(block_n=64, num_warps=2, num_stages=2)  # H200 sweep: benchmarks/GPU_NOTES.md
_MAX_SPLITS = 64
_MAX_SPLIT_BYTES = 64 << 20  # cap on the float32 partial outputs of a split launch
_SPLIT_WAVES = 3  # programs per SM to aim for when splitting long contexts


@_jit
def _store_kv_kernel(
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_mapping_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cb,
    stride_cs,
    stride_ch,
    NUM_KV_HEADS: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + t).to(tl.int64)
    h = tl.arange(0, HEADS_PAD)[:, None]
    d = tl.arange(0, HEAD_DIM)[None, :]
    mask = (h < NUM_KV_HEADS) & (slot >= 0)
    dst = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_cs + h * stride_ch + d
    k = tl.load(k_ptr + t * stride_kt + h * stride_kh + d, mask=mask)
    tl.store(k_cache_ptr + dst, k, mask=mask)
    v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=mask)
    tl.store(v_cache_ptr + dst, v, mask=mask)


@_jit
def _attend_keys(
    q,
    m_i,
    l_i,
    acc,
    k_cache_ptr,
    v_cache_ptr,
    bt_row,
    kv_head_ptrs,
    start,
    hi,
    pos,
    scale_log2,
    stride_cb,
    stride_cs,
    BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    MASK: tl.constexpr,
):
    """One online-softmax step over keys start..start+BLOCK_N, read through the block table.

    MASK drops keys at or past hi and keys after each row's position; without it every key
    of the tile must be visible to every row.
    """
    j = start + tl.arange(0, BLOCK_N)
    j_ok = j < hi
    if MASK:
        block = tl.load(bt_row + j // BLOCK_SIZE, mask=j_ok, other=0)
    else:
        block = tl.load(bt_row + j // BLOCK_SIZE)
    kv_ptrs = (block.to(tl.int64) * stride_cb + (j % BLOCK_SIZE) * stride_cs)[:, None] + kv_head_ptrs
    if MASK:
        k = tl.load(k_cache_ptr + kv_ptrs, mask=j_ok[:, None], other=0.0)
    else:
        k = tl.load(k_cache_ptr + kv_ptrs)
    s = tl.dot(q, tl.trans(k)) * scale_log2
    if MASK:
        s = tl.where(j_ok[None, :] & (j[None, :] <= pos[:, None]), s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if MASK:
        v = tl.load(v_cache_ptr + kv_ptrs, mask=j_ok[:, None], other=0.0)
    else:
        v = tl.load(v_cache_ptr + kv_ptrs)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@_jit
def _paged_attention_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    lse_ptr,
    block_tables_ptr,
    context_lens_ptr,
    query_start_loc_ptr,
    scale_log2,
    num_splits,
    kv_chunk,
    stride_qt,
    stride_qh,
    stride_cb,
    stride_cs,
    stride_ch,
    stride_bt,
    stride_ot,
    stride_oh,
    stride_os,
    stride_lt,
    stride_lh,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    SPLIT: tl.constexpr,
):
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    tile = tl.program_id(2) // num_splits
    split = tl.program_id(2) % num_splits
    ctx = tl.load(context_lens_ptr + b)
    q_start = tl.load(query_start_loc_ptr + b)
    q_len = tl.load(query_start_loc_ptr + b + 1) - q_start
    if tile * BLOCK_M >= q_len:  # the grid covers max_query_len; this sequence has fewer
        return

    # Row r of the Q tile is query token tile*BLOCK_M + r // GROUP_PAD, head r % GROUP_PAD
    # of the group; padding rows compute harmlessly and are never stored.
    r = tl.arange(0, ROWS)
    tok = tile * BLOCK_M + r // GROUP_PAD
    g = r % GROUP_PAD
    row_ok = (r < BLOCK_M * GROUP_PAD) & (g < GROUP) & (tok < q_len)
    pos = tl.minimum(ctx - q_len + tok, ctx - 1)
    q_row = (q_start + tok).to(tl.int64)
    head = kv_head * GROUP + g
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(
        q_ptr + q_row[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :], mask=row_ok[:, None], other=0.0
    )

    # Keys this program reads: its split's chunk, cut at the tile's last query position.
    last_tok = tl.minimum(tile * BLOCK_M + BLOCK_M, q_len)
    lo = split * kv_chunk
    hi = tl.minimum(lo + kv_chunk, ctx - q_len + last_tok)

    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, HEAD_DIM], tl.float32)
    bt_row = block_tables_ptr + b * stride_bt
    kv_head_ptrs = kv_head * stride_ch + d[None, :]
    # Whole tiles below the tile's first query position are visible to every row: no mask.
    first_pos = ctx - q_len + tile * BLOCK_M
    full_hi = lo + tl.maximum(tl.minimum(hi, first_pos + 1) - lo, 0) // BLOCK_N * BLOCK_N
    for start in range(lo, full_hi, BLOCK_N):
        m_i, l_i, acc = _attend_keys(
            q,
            m_i,
            l_i,
            acc,
            k_cache_ptr,
            v_cache_ptr,
            bt_row,
            kv_head_ptrs,
            start,
            hi,
            pos,
            scale_log2,
            stride_cb,
            stride_cs,
            BLOCK_N,
            BLOCK_SIZE,
            False,
        )
    for start in range(full_hi, hi, BLOCK_N):
        m_i, l_i, acc = _attend_keys(
            q,
            m_i,
            l_i,
            acc,
            k_cache_ptr,
            v_cache_ptr,
            bt_row,
            kv_head_ptrs,
            start,
            hi,
            pos,
            scale_log2,
            stride_cb,
            stride_cs,
            BLOCK_N,
            BLOCK_SIZE,
            True,
        )

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_ptrs = out_ptr + q_row[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :]
    if SPLIT:
        tl.store(o_ptrs + split * stride_os, out, mask=row_ok[:, None])
        lse = tl.where(l_i > 0, m_i + tl.log2(l_i), float("-inf"))
        tl.store(lse_ptr + q_row * stride_lt + head * stride_lh + split, lse, mask=row_ok)
    else:
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


@_jit
def _reduce_splits_kernel(
    partial_ptr,
    lse_ptr,
    out_ptr,
    num_splits,
    stride_pt,
    stride_ph,
    stride_ps,
    stride_lt,
    stride_lh,
    stride_ot,
    stride_oh,
    SPLITS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    s = tl.arange(0, SPLITS_PAD)
    s_ok = s < num_splits
    d = tl.arange(0, HEAD_DIM)
    lse = tl.load(lse_ptr + t * stride_lt + h * stride_lh + s, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    w = tl.exp2(lse - tl.where(m == float("-inf"), 0.0, m))
    part = tl.load(
        partial_ptr + t * stride_pt + h * stride_ph + s[:, None] * stride_ps + d[None, :], mask=s_ok[:, None], other=0.0
    )
    total = tl.sum(w, 0)
    out = tl.sum(part * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + t * stride_ot + h * stride_oh + d, out.to(out_ptr.dtype.element_ty))


def store_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write the new tokens' k/v [T, kv_heads, head_dim] into their slots; slots < 0 are skipped."""
    _require_triton()
    _check_cache(k_cache, v_cache)
    num_tokens, kv_heads, dim = k.shape
    if (kv_heads, dim) != tuple(k_cache.shape[2:]) or v.shape != k.shape:
        raise ValueError(f"k/v {tuple(k.shape)}/{tuple(v.shape)} do not fit the cache {tuple(k_cache.shape)}")
    if num_tokens == 0:
        return
    _store_kv_kernel[(num_tokens,)](
        k,
        v,
        k_cache,
        v_cache,
        slot_mapping,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        NUM_KV_HEADS=kv_heads,
        HEADS_PAD=triton.next_power_of_2(kv_heads),
        HEAD_DIM=dim,
        BLOCK_SIZE=k_cache.shape[1],
    )


def attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """q [T, heads, head_dim] -> out [T, heads, head_dim]; the new tokens' K/V must be stored."""
    _require_triton()
    _check_cache(k_cache, v_cache)
    num_tokens, heads, dim = q.shape
    kv_heads = k_cache.shape[2]
    if heads % kv_heads or dim != k_cache.shape[3] or q.dtype != k_cache.dtype or q.stride(2) != 1:
        raise ValueError(f"q {tuple(q.shape)} {q.dtype} does not fit the cache {tuple(k_cache.shape)} {k_cache.dtype}")
    if num_tokens == 0:
        return torch.empty_like(q)
    # One sequence whose context is no longer than its new tokens has no cached prefix
    # (true even when max_context_len is only an upper bound).
    if meta.is_prefill and meta.num_seqs == 1 and num_tokens == meta.max_context_len:
        return _prefill_without_prefix(q, k_cache, v_cache, meta.slot_mapping, scale)
    out = torch.empty_like(q)
    group = heads // kv_heads
    group_pad = triton.next_power_of_2(group)
    if meta.is_prefill:
        cfg, block_m = _PREFILL, max(1, _PREFILL_ROWS // group_pad)
    else:
        cfg, block_m = _DECODE, 1
    q_tiles = triton.cdiv(meta.max_query_len, block_m)
    max_splits = min(_MAX_SPLITS, max(1, _MAX_SPLIT_BYTES // (4 * num_tokens * heads * dim)))
    num_splits, kv_chunk = _kv_splits(
        meta.num_seqs * kv_heads * q_tiles, meta.max_context_len, cfg.block_n, max_splits, q.device
    )
    rows = max(16, block_m * group_pad)  # tl.dot needs at least 16 rows
    split = num_splits > 1
    if split:
        partial, lse = _split_buffers(meta, num_tokens, heads, dim, num_splits, q.device)
        target = partial
    else:
        target = lse = out
    grid = (meta.num_seqs, kv_heads, q_tiles * num_splits)
    bt = meta.block_tables
    _paged_attention_kernel[grid](
        q,
        k_cache,
        v_cache,
        target,
        lse,
        bt,
        meta.context_lens,
        meta.query_start_loc,
        scale * _LOG2E,
        num_splits,
        kv_chunk,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        bt.stride(0),
        target.stride(0),
        target.stride(1),
        target.stride(2) if split else 0,
        lse.stride(0),
        lse.stride(1),
        GROUP=group,
        GROUP_PAD=group_pad,
        BLOCK_M=block_m,
        ROWS=rows,
        BLOCK_N=cfg.block_n,
        HEAD_DIM=dim,
        BLOCK_SIZE=k_cache.shape[1],
        SPLIT=split,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    if split:
        _reduce_splits_kernel[(num_tokens, heads)](
            partial,
            lse,
            out,
            num_splits,
            partial.stride(0),
            partial.stride(1),
            partial.stride(2),
            lse.stride(0),
            lse.stride(1),
            out.stride(0),
            out.stride(1),
            SPLITS_PAD=triton.next_power_of_2(num_splits),
            HEAD_DIM=dim,
            num_warps=4,
        )
    return out


def _prefill_without_prefix(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor, scale: float
) -> torch.Tensor:
    """One sequence whose context is exactly its new tokens: SDPA's causal (flash) kernel.

    Picking its K/V out of the cache by slot costs a few microseconds; the paged kernel
    would lose far more than that to flash attention on a long prompt (GPU_NOTES.md).
    """
    kv_heads, dim = k_cache.shape[2:]
    k, v = (c.view(-1, kv_heads, dim)[slot_mapping].transpose(0, 1)[None] for c in (k_cache, v_cache))
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k, v, is_causal=True, scale=scale, enable_gqa=q.shape[1] != kv_heads
    )  # 4-D, or no flash kernel
    return out[0].transpose(0, 1).contiguous()


def _kv_splits(
    programs: int, max_context_len: int, block_n: int, max_splits: int, device: torch.device
) -> tuple[int, int]:
    """(num_splits, keys per split): about _SPLIT_WAVES programs per SM, whole tiles each."""
    tiles = max(1, triton.cdiv(max_context_len, block_n))
    want = triton.cdiv(_SPLIT_WAVES * _sm_count(device), programs)
    splits = max(1, min(tiles, want, max_splits))
    chunk = triton.cdiv(tiles, splits) * block_n
    return triton.cdiv(tiles * block_n, chunk), chunk


def _split_buffers(
    meta: AttentionMetadata, num_tokens: int, heads: int, dim: int, num_splits: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial outputs [T, heads, splits, dim] and log2-sum-exps, shared by every layer of a step."""
    key = ("triton_split_buffers", num_tokens, heads, dim, num_splits)
    if key not in meta.scratch:
        meta.scratch[key] = (
            torch.empty(num_tokens, heads, num_splits, dim, dtype=torch.float32, device=device),
            torch.empty(num_tokens, heads, num_splits, dtype=torch.float32, device=device),
        )
    return meta.scratch[key]


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    dim = k_cache.shape[3]
    if k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride() or k_cache.stride(3) != 1:
        raise ValueError("k_cache and v_cache must have one shape and layout, head_dim contiguous")
    if dim < 16 or dim & (dim - 1):
        raise ValueError(f"head_dim must be a power of two >= 16, got {dim}")


def _require_triton() -> None:
    if triton is None:
        raise RuntimeError("the triton attention backend needs the triton package and a CUDA device")
