"""Paged attention kernel times on CUDA: Triton backend vs torch_ref vs the memory floor.

Decode: every sequence has `context` cached tokens and one new query token; the floor is
the K/V bytes read once over the measured device copy bandwidth (bytes read + written
per second of a large device-to-device copy). Prefill, with and without a cached prefix:
against SDPA on contiguous K/V (the dense kernel a paged one is measured against). Each time is GPU time per call: one
CUDA graph calls the kernel on enough separate input sets that none is still in L2 when
it comes round again (so launch overhead, which a captured decode step does not pay, and
L2 hits stay out), and the median replay time is divided by the number of calls.

    python benchmarks/attention_kernels.py [--batches 1 8 32 128] [--contexts 512 4096]
"""

from __future__ import annotations

import argparse
import functools

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
        is_prefill=new_tokens > 1,
        slot_mapping=slots.flatten(),
        block_tables=block_tables,
        context_lens=torch.full((batch,), context, dtype=torch.int32, device=device),
        query_start_loc=torch.arange(0, batch * new_tokens + 1, new_tokens, dtype=torch.int32, device=device),
        max_query_len=new_tokens,
        max_context_len=context,
    )
    return q, k_cache, v_cache, meta


def graph_us(calls, replays: int = 20) -> float:
    """Median GPU microseconds per call of a CUDA graph that makes every call in `calls`."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # compile and fill per-step scratch outside the capture
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    times = []
    for _ in range(replays + 3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    del graph
    return 1e3 * sorted(times[3:])[replays // 2] / len(calls)


def input_sets(args, batch, context, new_tokens):
    """Enough independent paged batches that together they are three times the L2 size."""
    kv_bytes = 2 * 2 * batch * context * args.kv_heads * args.head_dim
    l2 = torch.cuda.get_device_properties().L2_cache_size
    n = min(32, -(-3 * l2 // kv_bytes))
    return kv_bytes, [
        paged_batch(
            batch,
            context,
            new_tokens,
            args.heads,
            args.kv_heads,
            args.head_dim,
            args.block_size,
            torch.bfloat16,
            "cuda",
        )
        for _ in range(n)
    ]


def time_backends(sets, scale):
    """(triton us, torch_ref us) per call over the input sets."""
    return tuple(
        graph_us([functools.partial(impl.attention, *s, scale) for s in sets]) for impl in (backend, torch_ref)
    )


def decode_rows(args, bandwidth):
    scale = args.head_dim**-0.5
    for batch in args.batches:
        for context in args.contexts:
            kv_bytes, sets = input_sets(args, batch, context, 1)
            floor = 1e6 * kv_bytes / bandwidth
            tri, ref = time_backends(sets, scale)
            yield batch, context, kv_bytes / 2**20, floor, tri, floor / tri, ref, ref / tri
            del sets
            torch.cuda.empty_cache()


def prefill_rows(args):
    """(batch, new tokens, context, SDPA us, triton us, torch_ref us) for prompts with and
    without a cached prefix; SDPA runs on contiguous K/V with a bottom-right causal mask."""
    from torch.nn.attention.bias import causal_lower_right

    scale = args.head_dim**-0.5
    for batch, new, context in ((1, 2048, 2048), (8, 512, 512), (1, 512, 4096)):
        _, sets = input_sets(args, batch, context, new)
        mask = causal_lower_right(new, context)
        dense = [
            (
                q.view(batch, new, args.heads, -1).transpose(1, 2),
                *(
                    torch.randn(batch, args.heads, context, args.head_dim, dtype=q.dtype, device=q.device)
                    for _ in range(2)
                ),
            )
            for q, *_ in sets
        ]
        sdpa = graph_us(
            [functools.partial(F.scaled_dot_product_attention, *d, attn_mask=mask, scale=scale) for d in dense]
        )
        tri, ref = time_backends(sets, scale)
        yield batch, new, context, sdpa, tri, ref
        del sets, dense
        torch.cuda.empty_cache()


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
    print(
        f"{torch.cuda.get_device_name()}  copy bandwidth {bandwidth / 1e12:.2f} TB/s  "
        f"heads {args.heads}/{args.kv_heads} x {args.head_dim}  block {args.block_size}  bf16"
    )
    print("\ndecode (one new token per sequence)")
    print(
        f"{'batch':>5} {'context':>7} {'KV MiB':>8} {'floor us':>9} {'triton us':>10} {'of floor':>8} "
        f"{'torch_ref us':>12} {'speedup':>8}"
    )
    for b, c, mib, floor, tri, frac, ref, speedup in decode_rows(args, bandwidth):
        print(f"{b:>5} {c:>7} {mib:>8.1f} {floor:>9.1f} {tri:>10.1f} {frac:>8.0%} {ref:>12.1f} {speedup:>7.1f}x")
    print("\nprefill (new tokens after context - new cached ones)")
    print(f"{'batch':>5} {'new':>5} {'context':>7} {'SDPA dense us':>13} {'triton us':>10} {'torch_ref us':>12}")
    for b, n, c, sdpa, tri, ref in prefill_rows(args):
        print(f"{b:>5} {n:>5} {c:>7} {sdpa:>13.1f} {tri:>10.1f} {ref:>12.1f}")


if __name__ == "__main__":
    main()
