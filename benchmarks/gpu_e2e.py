"""End to end on one GPU: the engine's HTTP server against transformers continuous batching,
the engine's per-token breakdown, and the `unsynced-gpu-timing` demonstration.

  table 2  output tokens/s of examples/gpu_llama2_7b.yaml (256 requests, prompt and output
           lengths uniform in [100, 1024], EOS ignored) through `llmtrace serve` with tracing
           on, against transformers `generate_batch` on the same prompts (same random-weight
           Llama-2-7B shape in bf16; its max_new_tokens is one number, the workload's mean
           output length, so its total output tokens match the engine's).
  table 3  that run's breakdown from `llmtrace analyze`: service overhead (all but the
           device time of forward + sampling) as a share of the step.
  table 4  examples/gpu_host_timed.yaml (antipatterns.host_timed_forward): forward and
           sampling as the report shows them, and the rule's text from report.md.
  table 5  (--tracing-cost N) the cost of tracing: table 2's workload with tracing on and
           off, N rounds interleaved (the order alternates), median and spread of each.
The engine side reuses benchmarks/engine_throughput.py (serve process, workload driver,
breakdown, transformers helpers).

Run (GPU):  python3 benchmarks/gpu_e2e.py --out DIR [--skip-transformers] [--tracing-cost N]
Goal: engine >= 5x generate_batch; service overhead <= 5% of the step.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import engine_throughput as et  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
MAIN_CONFIG = os.path.join(HERE, "..", "examples", "gpu_llama2_7b.yaml")
HOST_TIMED_CONFIG = os.path.join(HERE, "..", "examples", "gpu_host_timed.yaml")
THREADS = 4
RULE = "unsynced-gpu-timing"


def serve_and_analyze(config_path: str, run_dir: str, log) -> dict:
    """Engine tokens/s of the config's workload (traced into run_dir), then its report."""
    from engine.config import load_config
    from engine.engine_process import EngineCrashed
    from engine.tokenizer import Tokenizer, tokenizer_path

    cfg = load_config(config_path)
    tokenizer = Tokenizer(tokenizer_path(cfg.model))
    t0 = time.perf_counter()
    server = et.start_engine(cfg, run_dir + ".work", THREADS, run_dir)
    try:
        try:
            url = server.wait_ready()
        except EngineCrashed as e:
            log(e.log_tail)
            raise
        log(f"{os.path.basename(config_path)}: engine up in {time.perf_counter() - t0:.0f} s")
        et.drive_engine(url, et.warmup_workload(), tokenizer)
        tok_s, tokens = et.drive_engine(url, cfg.workload, tokenizer, cfg.engine.max_model_len)
    finally:
        server.stop()
    log(f"{os.path.basename(config_path)}: {tok_s:,.0f} tok/s, {tokens} tokens")
    report = json.loads(analyze(run_dir, "--json"))
    md = analyze(run_dir, "--markdown")
    with open(os.path.join(run_dir, "report.md"), "w") as f:
        f.write(md)
    return {
        "tok_s": tok_s,
        "tokens": tokens,
        "breakdown": report["breakdown"],
        "suggestions": report.get("suggestions"),
        "report_md": md,
    }


def engine_tok_s(config_path: str, workdir: str, out: str | None) -> float:
    """Output tokens/s of the config's workload through a fresh engine, traced into out or untraced."""
    from engine.config import load_config
    from engine.tokenizer import Tokenizer, tokenizer_path

    cfg = load_config(config_path)
    tokenizer = Tokenizer(tokenizer_path(cfg.model))
    server = et.start_engine(cfg, workdir, THREADS, out)
    try:
        url = server.wait_ready()
        et.drive_engine(url, et.warmup_workload(), tokenizer)
        return et.drive_engine(url, cfg.workload, tokenizer, cfg.engine.max_model_len)[0]
    finally:
        server.stop()


def tracing_cost(rounds: int, out_dir: str, log) -> dict:
    """Table 2's workload with tracing on and off, interleaved, the order alternating by round."""
    import statistics

    runs: dict[str, list[float]] = {"on": [], "off": []}
    for r in range(rounds):
        for mode in ("on", "off") if r % 2 == 0 else ("off", "on"):
            out = os.path.join(out_dir, f"cost_{r}_{mode}")
            runs[mode].append(engine_tok_s(MAIN_CONFIG, out + ".work", out if mode == "on" else None))
            log(f"tracing {mode}, round {r}: {runs[mode][-1]:,.1f} tok/s")
    med = {m: statistics.median(v) for m, v in runs.items()}
    return {"runs": runs, "median": med, "cost": 1 - med["on"] / med["off"]}


def analyze(run_dir: str, fmt: str) -> str:
    """`llmtrace analyze` of a run directory, as the user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "llmtrace.cli", "analyze", fmt, run_dir], check=True, capture_output=True, text=True
    ).stdout


def bench_transformers(config_path: str, log) -> dict:
    """generate_batch on the workload's prompts, at most max_num_seqs requests per batch."""
    import statistics

    from gpu_decode import hf_model

    from engine.config import load_config
    from engine.tokenizer import Tokenizer, tokenizer_path
    from engine.workload import iter_requests

    cfg = load_config(config_path)
    tokenizer = Tokenizer(tokenizer_path(cfg.model))
    prompts = et.prompt_token_ids(cfg, tokenizer)
    out_lens = [s.max_tokens for s in iter_requests(cfg.workload, tokenizer, cfg.engine.max_model_len)]
    mean_out = round(statistics.mean(out_lens))
    model = hf_model()
    gen_cfg = et.generation_config(mean_out, tokenizer)
    et.warm_up_transformers(model, prompts[0], gen_cfg)
    t0 = time.perf_counter()
    # a cache for max_num_seqs sequences of the longest length does not fit next to the weights
    tok_s, tokens = et.bench_generate_batch(
        model, prompts, cfg.engine.max_num_seqs, gen_cfg, cfg.engine.max_batched_tokens, size_cache=False
    )
    log(f"transformers generate_batch: {tok_s:,.0f} tok/s, {tokens} tokens ({time.perf_counter() - t0:.0f} s)")
    return {"tok_s": tok_s, "tokens": tokens, "engine_tokens": sum(out_lens), "max_new_tokens": mean_out}


def stage_ms(bd: dict) -> dict:
    return {s["name"]: round(s["ms_per_step"], 3) for s in bd["stages"]}


def rule_section(md: str, rule: str = RULE) -> str:
    """The report.md lines of one rule's finding (from its heading to the next heading)."""
    lines = md.splitlines()
    start = next((i for i, ln in enumerate(lines) if rule in ln), None)
    if start is None:
        return f"(no {rule} finding in report.md)"
    end = next((j for j in range(start + 1, len(lines)) if lines[j].startswith("#")), len(lines))
    return "\n".join(lines[start:end]).strip()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="run directories and results.json go here")
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--skip-engine", action="store_true", help="only transformers (results.json is rewritten)")
    p.add_argument(
        "--tracing-cost",
        type=int,
        default=0,
        metavar="N",
        help="also N rounds of tracing on vs off, interleaved (table 5)",
    )
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    log = lambda m: print(m, flush=True)  # noqa: E731
    results = {}

    def save():
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(results, f, indent=1, default=str)

    if not args.skip_engine:
        results["engine"] = serve_and_analyze(MAIN_CONFIG, os.path.join(args.out, "llama2_7b"), log)
        save()
        results["host_timed"] = serve_and_analyze(HOST_TIMED_CONFIG, os.path.join(args.out, "host_timed"), log)
        save()
    if not args.skip_transformers:
        results["transformers"] = bench_transformers(MAIN_CONFIG, log)
        save()
    if args.tracing_cost:
        results["tracing_cost"] = tracing_cost(args.tracing_cost, args.out, log)
        save()
        print_tracing_cost(results["tracing_cost"])
    if args.skip_engine:
        return 0

    e, h = results["engine"], results["host_timed"]
    bd = e["breakdown"]
    print("\n## table 2: end to end")
    print(f"engine {e['tok_s']:,.0f} tok/s", end="")
    if "transformers" in results:
        t = results["transformers"]
        print(
            f" | transformers generate_batch {t['tok_s']:,.0f} tok/s ({t['tokens']} tokens, max_new_tokens "
            f"{t['max_new_tokens']}; engine {t['engine_tokens']}) | {e['tok_s'] / t['tok_s']:.1f}x"
        )
    print("\n## table 3: breakdown")
    print(
        {
            k: bd.get(k)
            for k in ("steps", "tokens", "ms_per_step", "per_token_ms", "model_ms", "overhead_ms", "overhead_fraction")
        }
    )
    print(bd["headline"])
    print("stages ms/step:", stage_ms(bd))
    print("\n## table 4: host_timed_forward")
    print(h["breakdown"]["headline"])
    print("stages ms/step:", stage_ms(h["breakdown"]))
    print(rule_section(h["report_md"]))
    return 0


def print_tracing_cost(c: dict) -> None:
    print(f"\n## table 5: tracing cost (recorder backend {recorder_backend()})")
    for m in ("on", "off"):
        v = c["runs"][m]
        print(
            f"tracing {m}: median {c['median'][m]:,.1f} tok/s, runs {', '.join(f'{x:,.1f}' for x in v)} "
            f"(spread {max(v) - min(v):,.1f})"
        )
    print(f"cost: {100 * c['cost']:.2f}% of throughput")


def recorder_backend() -> str:
    """Which recorder the engine's processes load: they import llmtrace as this one does."""
    from llmtrace import recorder

    return recorder.BACKEND


if __name__ == "__main__":
    sys.exit(main())
