"""Decode step time of the engine's ModelRunner (CUDA graphs) against transformers eager
decode and against the bandwidth floor, random-weight Llama-2-7B in bf16, on one GPU.

What it measures, per batch B (context 512: B prompts of 512 tokens prefilled first):
  engine        the step period of greedy decode as the engine serves it (async
                scheduling): step n+1 is launched, its input ids placeholders, before
                step n's ids are read; median interval between consecutive results.
  one step      ModelRunner.execute of one step alone, host wall time (staging, graph
                replay, sampling, the wait for the ids): what a step costs when the host
                waits for each step before preparing the next.
                "graph" is the replay alone, timed with CUDA events.
  transformers  LlamaForCausalLM (sdpa) forward of one token per sequence with its
                DynamicCache + argmax, host wall time with a synchronize, median of STEPS.
  floor         bytes a step must read (every weight but the embedding table, plus the
                K/V of B x 512 tokens) over the measured copy bandwidth (read + write
                of a 1 GiB device-to-device copy).
It first checks that graph and eager decode give the same greedy tokens on this model, and
per batch that pipelined and one-at-a-time decode do.

Run (GPU):  python3 benchmarks/gpu_decode.py [--batches 1 8 32 128] [--json FILE]
Goal: <= 1.4x the floor at batch 1, >= 6,000 tok/s at batch 128.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

PRESET = "llama2-7b"
CONTEXT = 512
STEPS = 20
WARMUP = 3
BLOCK = 16
PREFILL_TOKENS = 8192  # prompt tokens per prefill step


def copy_bandwidth(torch) -> float:
    """Bytes/s of a 1 GiB device-to-device copy, read + write counted."""
    src = torch.empty(1 << 29, dtype=torch.int16, device="cuda").random_()
    dst = torch.empty_like(src)
    times = []
    for _ in range(10):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return 2 * src.numel() * 2 / statistics.median(times[2:])


def floor_s(model, batch: int, context: int, bandwidth: float) -> float:
    c = model.config
    weights = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "embed_tokens" not in n)
    kv = 2 * c.num_hidden_layers * batch * context * c.num_key_value_heads * c.head_dim * 2
    return (weights + kv) / bandwidth


# ---- the engine --------------------------------------------------------------------------


def decode_step(step_no: int, tokens: list[list[int]], block_tables, temperature: float = 0.0):
    """A StepInput with one new token per sequence (its last); sequence b owns block_tables[b]."""
    import numpy as np

    from engine.step_io import StepInput

    b = len(tokens)
    ctx = np.array([len(t) for t in tokens], np.int32)
    pos = ctx - 1
    slots = block_tables[np.arange(b), pos // BLOCK].astype(np.int64) * BLOCK + pos % BLOCK
    return StepInput(
        step=step_no,
        is_prefill=False,
        seq_ids=np.arange(b, dtype=np.int64),
        input_ids=np.array([t[-1] for t in tokens], np.int32),
        positions=pos.astype(np.int32),
        query_start_loc=np.arange(b + 1, dtype=np.int32),
        context_lens=ctx,
        block_tables=block_tables,
        slot_mapping=slots,
        temperature=np.full(b, temperature, np.float32),
        top_p=np.ones(b, np.float32),
        top_k=np.zeros(b, np.int32),
        seed=np.full(b, -1, np.int64),
    )


def prefill_steps(tokens: list[list[int]], block_tables):
    """Prefill StepInputs of whole prompts, PREFILL_TOKENS per step."""
    import numpy as np

    from engine.step_io import StepInput

    per_step = max(1, PREFILL_TOKENS // len(tokens[0]))
    for lo in range(0, len(tokens), per_step):
        rows = range(lo, min(lo + per_step, len(tokens)))
        lens = np.array([len(tokens[r]) for r in rows], np.int32)
        pos = np.concatenate([np.arange(n) for n in lens]).astype(np.int32)
        owner = np.repeat(np.array(list(rows)), lens)
        slots = block_tables[owner, pos // BLOCK].astype(np.int64) * BLOCK + pos % BLOCK
        n = len(rows)
        yield StepInput(
            step=0,
            is_prefill=True,
            seq_ids=np.array(list(rows), np.int64),
            input_ids=np.concatenate([tokens[r] for r in rows]).astype(np.int32),
            positions=pos,
            query_start_loc=np.concatenate([[0], np.cumsum(lens)]).astype(np.int32),
            context_lens=lens,
            block_tables=block_tables[lo : lo + n],
            slot_mapping=slots,
            temperature=np.zeros(n, np.float32),
            top_p=np.ones(n, np.float32),
            top_k=np.zeros(n, np.int32),
            seed=np.full(n, -1, np.int64),
        )


def prompts(batch: int, vocab: int, seed: int) -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(seed)
    return [[1] + rng.integers(3, vocab, CONTEXT - 1).tolist() for _ in range(batch)]


def prefill(runner, tokens: list[list[int]], block_tables) -> None:
    """Run the prompts' prefill steps, appending each sequence's first sampled token."""
    for step in prefill_steps(tokens, block_tables):
        out = runner.execute(step)
        for row, tok in zip(step.seq_ids.tolist(), out.token_ids.tolist(), strict=True):
            tokens[row].append(tok)


def run_decode(runner, tokens: list[list[int]], steps: int, block_tables) -> list[float]:
    """Prefill, then `steps` greedy decode steps (appending to tokens); host seconds per step."""
    prefill(runner, tokens, block_tables)
    return decode(runner, tokens, steps, block_tables)


def decode(runner, tokens: list[list[int]], steps: int, block_tables) -> list[float]:
    """`steps` greedy decode steps one at a time (appending to tokens); host seconds per step."""
    times = []
    for i in range(steps):
        step = decode_step(i + 1, tokens, block_tables)
        t0 = time.perf_counter()
        out = runner.execute(step)
        times.append(time.perf_counter() - t0)
        for t, tok in zip(tokens, out.token_ids.tolist(), strict=True):
            t.append(tok)
    return times


def run_decode_pipelined(runner, tokens: list[list[int]], steps: int, block_tables) -> list[float]:
    """Prefill, then `steps` greedy decode steps, each launched before the one before is read
    (placeholder inputs); host seconds between consecutive results."""
    from engine.sequence import PLACEHOLDER

    prefill(runner, tokens, block_tables)
    pending = runner.launch(decode_step(1, tokens, block_tables))
    done = []
    for i in range(1, steps + 1):
        nxt = None
        if i < steps:
            for t in tokens:
                t.append(PLACEHOLDER)
            nxt = runner.launch(decode_step(i + 1, tokens, block_tables))
        ids = pending.result().token_ids.tolist()
        done.append(time.perf_counter())
        for t, tok in zip(tokens, ids, strict=True):
            if nxt is not None:
                t[-1] = tok  # the placeholder the next step was launched with
            else:
                t.append(tok)
        pending = nxt
    return [b - a for a, b in zip(done, done[1:])]


def graph_replay_s(runner, batch: int, torch) -> float:
    """Device seconds of one replay of the bucket holding `batch` (inputs as last staged)."""
    from engine.cuda_graphs import bucket_for

    bucket = bucket_for(batch, runner.graphs.sizes)
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(STEPS):
        runner.graphs.replay(bucket, batch)
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / 1e3 / STEPS


def bench_engine(batches: list[int], bandwidth: float, log, profile: bool = False) -> tuple[dict, bool]:
    import numpy as np
    import torch

    from engine.config import ModelConfig
    from engine.model_runner import ModelRunner

    max_b = max(batches)
    blocks_per_seq = -(-(CONTEXT + WARMUP + STEPS + 1) // BLOCK)
    cfg = ModelConfig(preset=PRESET, dtype="bfloat16", device="cuda", seed=0)
    t0 = time.perf_counter()
    runner = ModelRunner(
        cfg,
        block_size=BLOCK,
        num_blocks=max_b * blocks_per_seq,
        cuda_graphs=True,
        max_num_seqs=max_b,
        max_model_len=blocks_per_seq * BLOCK,
    )
    log(f"engine: model + KV + {len(runner.graphs.sizes)} graphs in {time.perf_counter() - t0:.1f} s")
    tables = np.arange(max_b * blocks_per_seq, dtype=np.int32).reshape(max_b, blocks_per_seq)
    vocab = runner.model.config.vocab_size
    same = all([check_graphs_equal_eager(runner, tables, vocab, log, batch) for batch in (8, 6)])
    rows = {}
    for b in batches:
        alone, piped = prompts(b, vocab, b), prompts(b, vocab, b)
        times = run_decode(runner, alone, WARMUP + STEPS, tables[:b])[WARMUP:]
        periods = run_decode_pipelined(runner, piped, WARMUP + STEPS + 1, tables[:b])[WARMUP:]
        rows[b] = {
            "engine_ms": statistics.median(periods) * 1e3,
            "one_step_ms": statistics.median(times) * 1e3,
            "graph_ms": graph_replay_s(runner, b, torch) * 1e3,
            "floor_ms": floor_s(runner.model, b, CONTEXT, bandwidth) * 1e3,
            "pipelined_equal": [t[: len(a)] for t, a in zip(piped, alone)] == alone,
        }
        log(f"engine batch {b}: {rows[b]}")
        if not rows[b]["pipelined_equal"]:
            log(f"engine batch {b}: pipelined decode gave other tokens than one step at a time")
    if profile:
        log(kernel_profile(runner, min(batches), torch))
    del runner
    torch.cuda.empty_cache()
    return rows, same


def kernel_profile(runner, batch: int, torch) -> str:
    """Device time per kernel of graph replays at `batch` (torch.profiler), top rows."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        graph_replay_s(runner, batch, torch)
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60)


def check_graphs_equal_eager(runner, tables, vocab: int, log, batch: int, steps: int = 16) -> bool:
    """Greedy tokens of `batch` sequences with graphs and eagerly. A padded bucket (6 -> 8)
    runs other GEMM shapes, so bf16 rounding differs and near-tied random-weight logits can flip."""
    graphs, runs = runner.graphs, []
    for use in (graphs, None):
        runner.graphs = use
        tokens = prompts(batch, vocab, 7)
        run_decode(runner, tokens, steps, tables[:batch])
        runs.append([t[CONTEXT:] for t in tokens])
    runner.graphs = graphs
    same = runs[0] == runs[1]
    agree = sum(a == b for x, y in zip(*runs) for a, b in zip(x, y)) / sum(map(len, runs[0]))
    first = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), None) for x, y in zip(*runs)]
    log(
        f"graphs vs eager greedy tokens (bf16, batch {batch}, {steps} steps): "
        f"{'identical' if same else f'{agree:.1%} agree; first differing step per sequence {first}'}"
    )
    return same


# ---- transformers ------------------------------------------------------------------------


def hf_model(preset: str = PRESET):
    """transformers LlamaForCausalLM with the preset's shape, random bf16 weights, on the GPU (sdpa)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from engine.models.presets import PRESETS

    with torch.device("cuda"):
        model = LlamaForCausalLM._from_config(
            LlamaConfig(**PRESETS[preset]), dtype=torch.bfloat16, attn_implementation="sdpa"
        )
    return model.eval().requires_grad_(False)


def bench_transformers(batches: list[int], log) -> dict:
    import torch

    model = hf_model()
    rows = {}
    for b in batches:
        ids = torch.tensor(prompts(b, model.config.vocab_size, b), device="cuda")
        with torch.inference_mode():
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
            cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            times = []
            for _ in range(WARMUP + STEPS):
                t0 = time.perf_counter()
                out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
        rows[b] = statistics.median(times[WARMUP:]) * 1e3
        log(f"transformers batch {b}: {rows[b]:.1f} ms")
        del out, cache
        torch.cuda.empty_cache()
    return rows


def render(batches, engine: dict, hf: dict, bandwidth: float) -> str:
    lines = [
        "| batch | engine ms/step | one step alone ms | graph replay ms | floor ms | engine / floor "
        "| engine tok/s | transformers ms/step | transformers tok/s | speedup |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for b in batches:
        e, h = engine[b], hf.get(b)
        hf_cols = f"{h:.1f} | {b / h * 1e3:,.0f} | {h / e['engine_ms']:.1f}x" if h else "- | - | -"
        lines.append(
            f"| {b} | {e['engine_ms']:.2f} | {e['one_step_ms']:.2f} | {e['graph_ms']:.2f} | "
            f"{e['floor_ms']:.2f} | "
            f"{e['engine_ms'] / e['floor_ms']:.2f}x | {b / e['engine_ms'] * 1e3:,.0f} | {hf_cols} |"
        )
    return f"copy bandwidth {bandwidth / 1e12:.2f} TB/s, context {CONTEXT}\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 128])
    p.add_argument("--json", help="also write the numbers here")
    p.add_argument("--profile", action="store_true", help="print the kernels of a replay at the smallest batch")
    p.add_argument("--skip-transformers", action="store_true")
    args = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gpu_decode: needs a CUDA GPU", file=sys.stderr)
        return 2
    log = lambda m: print(m, flush=True)  # noqa: E731
    bandwidth = copy_bandwidth(torch)
    engine, same = bench_engine(args.batches, bandwidth, log, args.profile)
    hf = {} if args.skip_transformers else bench_transformers(args.batches, log)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(render(args.batches, engine, hf, bandwidth))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "device": torch.cuda.get_device_name(),
                    "bandwidth": bandwidth,
                    "graphs_equal_eager": same,
                    "engine": engine,
                    "transformers": hf,
                },
                f,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
