"""Paged attention kernel times on CUDA: Triton backend vs torch_ref vs the memory floor.

Decode: every sequence has `context` cached tokens and one new query token; the floor is
the K/V bytes read once over the measured device copy bandwidth (bytes read + written
per second of a large device-to-device copy). Prefill: prompts with no cached prefix,
against SDPA's causal kernel on contiguous tensors. Times are medians of
triton.testing.do_bench, which flushes L2 before each call.

    python benchmarks/attention_kernels.py [--batches 1 8 32 128] [--contexts 512 4096]
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from engine.attention import torch_ref
from engine.attention import triton as backend
from engine.attention.metadata import AttentionMetadata


def copy_bandwidth(device) -> float:
    """Bytes per second of a 1 GiB device-to-device copy, counting read and write."""
    from triton.testing import do_bench

    src = torch.randn(2**29, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def paged_batch(batch, context, new_tokens, heads, kv_heads, dim, block_size, dtype, device):
    """Full sequences of `context` tokens in shuffled blocks; the last `new_tokens` are the queries."""
    per_seq = -(-context // block_size)
    num_blocks = batch * per_seq
    block_tables = torch.randperm(num_blocks, device=device).view(batch, per_seq).int()
    k_cache = torch.randn(num_blocks, block_size, kv_heads, dim, dtype=dtype, device=device)
    v_cache = torch.randn_like(k_cache)
    q = torch.randn(batch * new_tokens, heads, dim, dtype=dtype, device=device)
    pos = torch.arange(context - new_tokens, context, device=device)
    slots = block_tables[:, pos // block_size].long() * block_size + pos % block_size
    meta = AttentionMetadata(
        is_prefill=new_tokens > 1, slot_mapping=slots.flatten(), block_tables=block_tables,
        context_lens=torch.full((batch,), context, dtype=torch.int32, device=device),
        query_start_loc=torch.arange(0, batch * new_tokens + 1, new_tokens, dtype=torch.int32, device=device),
        max_query_len=new_tokens, max_context_len=context)
    return q, k_cache, v_cache, meta


def median_us(fn) -> float:
    from triton.testing import do_bench

    return 1e3 * do_bench(fn, warmup=25, rep=200, return_mode="median")


def decode_rows(args, bandwidth):
    for batch in args.batches:
        for context in args.contexts:
            q, kc, vc, meta = paged_batch(batch, context, 1, args.heads, args.kv_heads, args.head_dim,
                                          args.block_size, torch.bfloat16, "cuda")
            scale = args.head_dim ** -0.5
            kv_bytes = 2 * kc.element_size() * batch * context * args.kv_heads * args.head_dim
            floor = 1e6 * kv_bytes / bandwidth
            tri = median_us(lambda: backend.attention(q, kc, vc, meta, scale))
            ref = median_us(lambda: torch_ref.attention(q, kc, vc, meta, scale))
            yield batch, context, kv_bytes / 2**20, floor, tri, floor / tri, ref, ref / tri
            del q, kc, vc, meta
            torch.cuda.empty_cache()


def prefill_rows(args):
    for batch, prompt in ((1, 2048), (8, 512)):
        q, kc, vc, meta = paged_batch(batch, prompt, prompt, args.heads, args.kv_heads, args.head_dim,
                                      args.block_size, torch.bfloat16, "cuda")
        scale = args.head_dim ** -0.5
        group = args.heads // args.kv_heads
        dense = [x.view(batch, prompt, -1, args.head_dim).transpose(1, 2) for x in (
            q, torch.randn_like(q[:, ::group]), torch.randn_like(q[:, ::group]))]
        sdpa = median_us(lambda: F.scaled_dot_product_attention(*dense, is_causal=True, scale=scale,
                                                                enable_gqa=True))
        tri = median_us(lambda: backend.attention(q, kc, vc, meta, scale))
        ref = median_us(lambda: torch_ref.attention(q, kc, vc, meta, scale))
        yield batch, prompt, sdpa, tri, ref


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 128])
    p.add_argument("--contexts", type=int, nargs="+", default=[512, 4096])
    p.add_argument("--heads", type=int, default=32, help="Llama-2-7B: 32 heads of 128, MHA")
    p.add_argument("--kv-heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    args = p.parse_args()
    if not (torch.cuda.is_available() and backend.AVAILABLE):
        raise SystemExit("needs a CUDA device and triton")

    bandwidth = copy_bandwidth("cuda")
    print(f"{torch.cuda.get_device_name()}  copy bandwidth {bandwidth / 1e12:.2f} TB/s  "
          f"heads {args.heads}/{args.kv_heads} x {args.head_dim}  block {args.block_size}  bf16")
    print("\ndecode (one new token per sequence)")
    print(f"{'batch':>5} {'context':>7} {'KV MiB':>8} {'floor us':>9} {'triton us':>10} {'of floor':>8} "
          f"{'torch_ref us':>12} {'speedup':>8}")
    for b, c, mib, floor, tri, frac, ref, speedup in decode_rows(args, bandwidth):
        print(f"{b:>5} {c:>7} {mib:>8.1f} {floor:>9.1f} {tri:>10.1f} {frac:>8.0%} {ref:>12.1f} {speedup:>7.1f}x")
    print("\nprefill (no cached prefix)")
    print(f"{'batch':>5} {'prompt':>7} {'SDPA causal us':>14} {'triton us':>10} {'torch_ref us':>12}")
    for b, n, sdpa, tri, ref in prefill_rows(args):
        print(f"{b:>5} {n:>7} {sdpa:>14.1f} {tri:>10.1f} {ref:>12.1f}")


if __name__ == "__main__":
    main()
