"""Reference paged attention in plain torch (the CPU backend).

K/V of every sequence are gathered through its block table into a padded
[B, kv_heads, max_context_len, head_dim] view and fed to SDPA with one mask per
sequence, so prefill (with or without a cached prefix) and decode take the same path,
vectorised over the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .metadata import AttentionMetadata


def store_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write the new tokens' k/v [T, kv_heads, head_dim] into their cache slots."""
    heads, dim = k_cache.shape[2], k_cache.shape[3]
    k_cache.view(-1, heads, dim).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, heads, dim).index_copy_(0, slot_mapping, v)


def attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """q [T, heads, head_dim] -> out [T, heads, head_dim]; the new tokens' K/V must be stored."""
    num_tokens, heads, dim = q.shape
    kv_heads = k_cache.shape[2]
    group = heads // kv_heads
    b, ql = meta.num_seqs, meta.max_query_len
    rows = _query_rows(meta)
    if rows is not None:
        q = q.new_zeros(b * ql, heads, dim).index_copy_(0, rows, q)
    # Query heads sharing a kv head are stacked along the query axis: [B, kv_heads, group*Q, D].
    q = q.view(b, ql, kv_heads, group, dim).permute(0, 2, 3, 1, 4).reshape(b, kv_heads, group * ql, dim)
    out = F.scaled_dot_product_attention(
        q, _gather(k_cache, meta), _gather(v_cache, meta), attn_mask=_mask(meta, group), scale=scale
    )
    out = out.view(b, kv_heads, group, ql, dim).permute(0, 3, 1, 2, 4).reshape(b * ql, heads, dim)
    return out if rows is None else out.index_select(0, rows)


def _gather(cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    """The first max_context_len cached tokens of each sequence: [B, kv_heads, K, head_dim]."""
    block_size, kv_heads, dim = cache.shape[1:]
    n_blocks = -(-meta.max_context_len // block_size)
    # index_select on the flat table: half the time of advanced indexing on CPU
    x = cache.index_select(0, meta.block_tables[:, :n_blocks].reshape(-1))  # [B * n_blocks, bs, kv, D]
    x = x.view(meta.num_seqs, n_blocks * block_size, kv_heads, dim)[:, : meta.max_context_len]
    return x.transpose(1, 2)


def _query_rows(meta: AttentionMetadata) -> torch.Tensor | None:
    """Row of each new token in the padded [B * max_query_len] query; None when already dense."""
    s = meta.scratch
    if "rows" not in s:
        num_tokens = meta.slot_mapping.shape[0]
        b, ql = meta.num_seqs, meta.max_query_len
        if num_tokens == b * ql:  # every sequence has max_query_len new tokens (e.g. decode)
            s["rows"] = None
        else:
            qsl = meta.query_start_loc.long()
            seq = torch.repeat_interleave(
                torch.arange(b, device=qsl.device), qsl[1:] - qsl[:-1], output_size=num_tokens
            )
            s["rows"] = seq * ql + torch.arange(num_tokens, device=qsl.device) - qsl[seq]
    return s["rows"]


def _mask(meta: AttentionMetadata, group: int) -> torch.Tensor:
    """[B, 1, group*Q, K] bool: query i of sequence b sees keys 0..its own position.

    Padding query rows see the whole context, so no row is fully masked (no NaNs).
    """
    key = ("mask", group)
    s = meta.scratch
    if key not in s:
        qsl, ctx = meta.query_start_loc.long(), meta.context_lens.long()
        dev = ctx.device
        b, ql, kl = meta.num_seqs, meta.max_query_len, meta.max_context_len
        q_pos = (ctx - (qsl[1:] - qsl[:-1]))[:, None] + torch.arange(ql, device=dev)  # [B, Q]
        keys = torch.arange(kl, device=dev)
        mask = (keys <= q_pos[:, :, None]) & (keys < ctx[:, None, None])  # [B, Q, K]
        s[key] = mask[:, None].expand(b, group, ql, kl).reshape(b, 1, group * ql, kl)
    return s[key]
