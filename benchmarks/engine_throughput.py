"""Output tokens/s of the engine against transformers, same model, prompts and lengths.

What it measures, at each concurrency C (closed loop: C requests in flight):
  engine           `llmtrace serve` (server + master in one process, the agent in another,
                   as `llmtrace run` starts them) driven through its HTTP API by the workload
                   client in this process; with tracing on (`--out`, as it is used) and off.
  generate         transformers `LlamaForCausalLM.generate`, static batches of C prompts
                   (left padding, greedy, min_new_tokens = max_new_tokens).
  generate_batch   transformers continuous batching, at most C requests per batch, its
                   cache sized for the workload (auto-sizing on the CPU reserves a cache and
                   an attention mask from free memory, which costs seconds per call).
Every system runs the same requests: max(MIN_REQUESTS, 2*C) prompts of 64-128 tokens (text
from the engine's workload generator, token ids from the engine's tokenizer), 64 greedy
output tokens each with EOS ignored, on the same random weights (the engine's tiny model
saved with `save_checkpoint` and loaded with `from_pretrained`). Tokens/s = output tokens /
wall time of the whole set, after a short warm-up. The machine is shared, so the systems run
in interleaved rounds (`--repeats`, the order rotating) and each keeps its best round; both
engines (traced, untraced) stay up meanwhile, the idle one blocked on a socket. Torch uses
the same number of threads in every process that runs the model (`--threads`; the agent
gets OMP_NUM_THREADS).
Per concurrency it also prints the engine's own per-step breakdown from its trace (the
analyzer's report), and keeps the traced run directories for `llmtrace analyze`.

Run:  .venv/bin/python benchmarks/engine_throughput.py [--quick] [--concurrency 1 8 32] [--threads 1]
                                                       [--repeats 2] [--out DIR]

Goal: the engine beats both transformers paths at concurrency >= 8 on the CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field

from engine.engine_process import EngineProcess

MIN_REQUESTS = 8
REQUESTS_PER_SLOT = 2
TOP_STAGES = 3


@dataclass(frozen=True)
class Sizes:
    input_min: int = 64
    input_max: int = 128
    output_len: int = 64
    min_requests: int = MIN_REQUESTS
    requests_per_slot: int = REQUESTS_PER_SLOT

    def num_requests(self, concurrency: int) -> int:
        return max(self.min_requests, self.requests_per_slot * concurrency)


QUICK = Sizes(input_min=32, input_max=64, output_len=16, min_requests=4, requests_per_slot=1)


@dataclass
class Result:
    """Best tokens/s per system and concurrency, and the engine's breakdown per concurrency."""

    tok_s: dict[str, dict[int, float]] = field(default_factory=dict)
    breakdown: dict[int, dict] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, system: str, concurrency: int, tok_s: float) -> None:
        """One round's measurement; the best round is kept."""
        by_c = self.tok_s.setdefault(system, {})
        by_c[concurrency] = max(tok_s, by_c.get(concurrency, 0.0))


# ---- the requests ------------------------------------------------------------------------


def run_config(concurrency: int, sizes: Sizes, seed: int = 0):
    """The engine's config for one concurrency: tiny float32 model on the CPU, at most
    `concurrency` sequences per step (as generate_batch gets), the closed-loop workload
    (its seed picks the prompts and the request ids)."""
    from engine.config import load_config

    return load_config(
        {
            "model": {"preset": "tiny", "dtype": "float32", "device": "cpu"},
            "engine": {"max_num_seqs": concurrency},
            "workload": {
                "arrival": "closed",
                "concurrency": concurrency,
                "num_requests": sizes.num_requests(concurrency),
                "input_len": {"dist": "uniform", "min": sizes.input_min, "max": sizes.input_max},
                "output_len": sizes.output_len,
                "ignore_eos": True,
                "seed": seed,
            },
        }
    )


def prompt_token_ids(cfg, tokenizer) -> list[list[int]]:
    """The workload's prompts as the server tokenizes them (BOS included)."""
    from engine.workload import iter_requests

    prompts = []
    for spec in iter_requests(cfg.workload, tokenizer, cfg.engine.max_model_len):
        ids = tokenizer.encode(spec.prompt)
        if len(ids) != spec.prompt_len:
            raise RuntimeError(
                f"{spec.req_id}: prompt encodes to {len(ids)} tokens, the workload says {spec.prompt_len}"
            )
        prompts.append(ids)
    return prompts


# ---- the engine --------------------------------------------------------------------------


def start_engine(cfg, workdir: str, threads: int, out: str | None) -> EngineProcess:
    """`llmtrace serve` in a child process (it spawns the agent), recording into `out` when
    given, with no recording settings inherited from this process."""
    import yaml

    os.makedirs(workdir, exist_ok=True)
    config_path = os.path.join(workdir, "engine.yaml")
    with open(config_path, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMTRACE_")}
    env["OMP_NUM_THREADS"] = str(threads)
    return EngineProcess(config_path, workdir, out=out, env=env)


def warmup_workload():
    """One short request; seed -1 is no round's seed, so its request id is its own."""
    from engine.config import load_config

    return load_config(
        {"workload": {"num_requests": 1, "concurrency": 1, "input_len": 16, "output_len": 4, "seed": -1}}
    ).workload


def drive_engine(url: str, wl, tokenizer, max_model_len: int | None = None) -> tuple[float, int]:
    """(output tokens/s, output tokens) of workload `wl` through the engine's HTTP API."""
    from engine.workload import run_workload

    results, summary = asyncio.run(run_workload(url, wl, tokenizer, max_model_len=max_model_len))
    if summary.errors:
        first = next(r.error for r in results if not r.ok)
        raise RuntimeError(f"{summary.errors} engine requests failed, e.g. {first}")
    return summary.throughput_tok_s, summary.output_tokens


def step_breakdown(run_dir: str) -> dict:
    """The analyzer's per-step costs of a traced engine run: model (forward + sampling) vs the rest."""
    from llmtrace.analyze.report import build_report
    from llmtrace.load import load_trace

    report = build_report(load_trace(run_dir))
    bd = report["breakdown"]
    if bd is None:
        raise RuntimeError(f"{run_dir}: the trace has no engine steps")
    per_step = bd["tokens"] / bd["steps"]  # tokens per step = mean batch
    return {
        "steps": bd["steps"],
        "ms_per_step": bd["ms_per_step"],
        "model_ms_per_step": bd["model_ms"] * per_step,
        "other_ms_per_step": bd["overhead_ms"] * per_step,
        "overhead_fraction": bd["overhead_fraction"],
        "top": [(s["name"], s["ms_per_step"]) for s in bd["stages"][:TOP_STAGES]],
        "tracing_us_per_token": report["tracing"]["instrumentation_cost_us_per_token"],
    }


# ---- transformers ------------------------------------------------------------------------


def save_tiny_checkpoint(ckpt_dir: str) -> str:
    """The engine's tiny model (seed 0, the engine's default) as an HF checkpoint directory."""
    from engine.models.loader import build_random_model, save_checkpoint

    return str(save_checkpoint(build_random_model("tiny", "float32", "cpu", seed=0), ckpt_dir))


def load_hf_model(ckpt_dir: str):
    import torch
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(ckpt_dir, dtype=torch.float32, attn_implementation="sdpa").eval()


def generation_config(output_len: int, tokenizer):
    """Greedy, exactly output_len new tokens (EOS suppressed until then)."""
    from transformers import GenerationConfig

    return GenerationConfig(
        max_new_tokens=output_len,
        min_new_tokens=output_len,
        do_sample=False,
        eos_token_id=tokenizer.eos_id,
        bos_token_id=tokenizer.bos_id,
        pad_token_id=0,
    )


def _generate(model, prompts: list[list[int]], gen_cfg) -> int:
    """One left-padded static batch; returns the number of new tokens."""
    import torch

    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg)
    return (out.shape[1] - width) * len(prompts)


def bench_generate(model, prompts: list[list[int]], concurrency: int, gen_cfg) -> tuple[float, int]:
    """(output tokens/s, new tokens) of static batches of `concurrency` prompts, one after another."""
    t0 = time.perf_counter()
    tokens = sum(_generate(model, prompts[i : i + concurrency], gen_cfg) for i in range(0, len(prompts), concurrency))
    return tokens / (time.perf_counter() - t0), tokens


def continuous_batching_config(concurrency: int, longest: int, max_batch_tokens: int):
    """At most `concurrency` requests a step, KV pages for that many sequences of `longest` tokens."""
    from transformers.generation import ContinuousBatchingConfig

    default = ContinuousBatchingConfig()
    pages = -(-longest // (getattr(default, "page_size", None) or default.block_size))  # block_size before 5.23
    return ContinuousBatchingConfig(
        max_requests_per_batch=concurrency, max_batch_tokens=max_batch_tokens, num_blocks=concurrency * pages
    )


def bench_generate_batch(
    model, prompts: list[list[int]], concurrency: int, gen_cfg, max_batch_tokens: int, size_cache: bool = True
) -> tuple[float, int]:
    """(output tokens/s, new tokens) of continuous batching with at most `concurrency` requests a step.
    size_cache: a KV cache for `concurrency` sequences of the longest length (else transformers
    sizes it from free memory)."""
    cb_cfg = continuous_batching_config(concurrency, max(map(len, prompts)) + gen_cfg.max_new_tokens, max_batch_tokens)
    if not size_cache:
        cb_cfg.num_blocks = None
    t0 = time.perf_counter()
    outputs = model.generate_batch(
        prompts, generation_config=gen_cfg, continuous_batching_config=cb_cfg, progress_bar=False
    )
    elapsed = time.perf_counter() - t0
    if len(outputs) != len(prompts) or any(o.error for o in outputs.values()):
        raise RuntimeError(f"generate_batch finished {len(outputs)} of {len(prompts)} requests")
    tokens = sum(len(o.generated_tokens) for o in outputs.values())
    return tokens / elapsed, tokens


def warm_up_transformers(model, prompt: list[int], gen_cfg) -> None:
    """A few tokens through both paths (first calls pay one-time setup)."""
    import copy

    short = copy.deepcopy(gen_cfg)
    short.max_new_tokens = short.min_new_tokens = 4
    _generate(model, [prompt], short)
    model.generate_batch(
        [prompt],
        generation_config=short,
        progress_bar=False,
        continuous_batching_config=continuous_batching_config(1, len(prompt) + 4, len(prompt)),
    )


# ---- one run -----------------------------------------------------------------------------

ENGINE_TRACED = "engine, tracing on"
ENGINE_PLAIN = "engine, tracing off"
HF_GENERATE = "transformers generate (static batch)"
HF_GENERATE_BATCH = "transformers generate_batch (continuous)"


def run(concurrencies: list[int], sizes: Sizes, threads: int, out: str, repeats: int = 1, log=print) -> Result:
    import torch

    from engine.tokenizer import Tokenizer

    torch.set_num_threads(threads)
    tokenizer = Tokenizer()
    result = Result()
    with tempfile.TemporaryDirectory(prefix="engine-throughput-ckpt-") as ckpt:
        model = load_hf_model(save_tiny_checkpoint(ckpt))
    warm_up_transformers(model, tokenizer.encode("warm up"), generation_config(4, tokenizer))
    for c in concurrencies:
        run_dir = os.path.join(out, f"c{c}")
        measure(c, sizes, threads, run_dir, model, tokenizer, repeats, result)
        result.breakdown[c] = step_breakdown(run_dir)
        log(f"concurrency {c}: " + ", ".join(f"{s} {v[c]:.0f}" for s, v in result.tok_s.items()) + " tok/s")
    return result


def measure(c: int, sizes: Sizes, threads: int, run_dir: str, model, tokenizer, repeats: int, result: Result) -> None:
    """Every system at concurrency c, `repeats` interleaved rounds (the order rotating, so load
    changes on the shared machine hit all alike); keeps each system's best round. Round r runs
    the workload of seed r on every system (its own request ids, so the trace's requests stay
    apart). Both engines (traced into run_dir, untraced) are up the whole time; the idle one
    waits on a socket."""
    gen_cfg = generation_config(sizes.output_len, tokenizer)
    cfg = run_config(c, sizes)
    with tempfile.TemporaryDirectory(prefix="engine-throughput-") as workdir:
        servers = {
            ENGINE_TRACED: start_engine(cfg, os.path.join(workdir, "on"), threads, run_dir),
            ENGINE_PLAIN: start_engine(cfg, os.path.join(workdir, "off"), threads, None),
        }
        try:
            urls = {name: server.wait_ready() for name, server in servers.items()}
            for url in urls.values():
                drive_engine(url, warmup_workload(), tokenizer)
            for r in range(repeats):
                cfg = run_config(c, sizes, seed=r)
                prompts = prompt_token_ids(cfg, tokenizer)
                systems = {
                    name: functools.partial(drive_engine, url, cfg.workload, tokenizer, cfg.engine.max_model_len)
                    for name, url in urls.items()
                }
                systems[HF_GENERATE] = functools.partial(bench_generate, model, prompts, c, gen_cfg)
                systems[HF_GENERATE_BATCH] = functools.partial(
                    bench_generate_batch, model, prompts, c, gen_cfg, cfg.engine.max_batched_tokens
                )
                names = list(systems)
                for name in names[r % len(names) :] + names[: r % len(names)]:
                    tok_s, tokens = systems[name]()
                    result.add(name, c, tok_s)
                    if tokens != len(prompts) * sizes.output_len:
                        result.notes.append(
                            f"{name} at concurrency {c}, round {r}: {tokens} output tokens, "
                            f"not {len(prompts) * sizes.output_len}"
                        )
        finally:
            for server in servers.values():
                server.stop()


# ---- printing ----------------------------------------------------------------------------


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        import platform

        return platform.machine()


def header(sizes: Sizes, threads: int, repeats: int) -> str:
    import torch
    import transformers

    from engine.models.presets import PRESETS

    p = PRESETS["tiny"]
    return (
        f"{cpu_name()}, {os.cpu_count()} cores | torch {torch.__version__}, "
        f"transformers {transformers.__version__} | torch threads per model process: {threads} | model tiny "
        f"(float32, {p['num_hidden_layers']} layers, hidden {p['hidden_size']}, heads {p['num_attention_heads']}/"
        f"{p['num_key_value_heads']} kv, vocab {p['vocab_size']}) | prompts {sizes.input_min}-{sizes.input_max} "
        f"tokens, {sizes.output_len} output tokens, greedy, EOS ignored, "
        f"max({sizes.min_requests}, {sizes.requests_per_slot}*C) requests | best of {repeats} interleaved round(s)"
    )


def render(result: Result, concurrencies: list[int], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=140)
    console.print(title)
    t = Table(title="Output tokens/s (higher is better)")
    t.add_column("system")
    for c in concurrencies:
        t.add_column(f"C={c}", justify="right")
    for system, by_c in result.tok_s.items():
        t.add_row(system, *(f"{by_c[c]:.1f}" for c in concurrencies))
    traced, plain = result.tok_s[ENGINE_TRACED], result.tok_s[ENGINE_PLAIN]
    t.add_row("tracing cost (off -> on)", *(f"{(plain[c] - traced[c]) / plain[c]:+.1%}" for c in concurrencies))
    best_hf = {c: max(result.tok_s[HF_GENERATE][c], result.tok_s[HF_GENERATE_BATCH][c]) for c in concurrencies}
    t.add_row("engine (on) / best transformers", *(f"{traced[c] / best_hf[c]:.2f}x" for c in concurrencies))
    console.print(t)
    b = Table(title="Engine per-step breakdown (traced run; model = forward + sampling, host time on the CPU)")
    for col in (
        "C",
        "steps",
        "ms/step",
        "model ms/step",
        "other ms/step",
        "overhead",
        "top other stages (ms/step)",
        "span cost us/token",
    ):
        b.add_column(col, justify="left" if col.startswith("top") else "right")
    for c in concurrencies:
        d = result.breakdown[c]
        b.add_row(
            str(c),
            str(d["steps"]),
            f"{d['ms_per_step']:.1f}",
            f"{d['model_ms_per_step']:.1f}",
            f"{d['other_ms_per_step']:.1f}",
            f"{d['overhead_fraction']:.0%}",
            ", ".join(f"{name} {ms:.1f}" for name, ms in d["top"]),
            f"{d['tracing_us_per_token']:.1f}",
        )
    console.print(b)
    for note in result.notes:
        console.print(f"note: {note}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--threads", type=int, default=1, help="torch threads in every process that runs the model")
    p.add_argument("--repeats", type=int, help="interleaved rounds per concurrency, best kept (default 2, quick 1)")
    p.add_argument("--quick", action="store_true", help="short prompts and outputs, fewer requests, one round")
    p.add_argument("--out", help="where the traced engine runs go (DIR/c<C>); default runs/engine_throughput-<time>")
    args = p.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 2)
    if min(args.concurrency) < 1 or args.threads < 1 or repeats < 1:
        p.error("--concurrency, --threads and --repeats take positive integers")
    sizes = QUICK if args.quick else Sizes()
    out = os.path.abspath(args.out or os.path.join("runs", time.strftime("engine_throughput-%Y%m%d-%H%M%S")))
    t0 = time.perf_counter()
    result = run(args.concurrency, sizes, args.threads, out, repeats)
    render(result, args.concurrency, header(sizes, args.threads, repeats))
    print(
        f"traced engine runs: {out}/c<C> (llmtrace analyze {out}/c{args.concurrency[-1]}); "
        f"benchmark took {time.perf_counter() - t0:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
