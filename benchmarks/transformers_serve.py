"""Someone else's real server under `llmtrace record`: `transformers serve` (the
OpenAI-compatible FastAPI server that ships with transformers) on a tiny random-weight
Llama saved locally (nothing is downloaded: the engine's tiny model, and a byte-level BPE
tokenizer trained on the repo's shipped corpus), driven by --requests completions, with
no change to its code. Prints the report's breakdown and findings, and with --compare
the server's throughput untraced and recorded, interleaved.

Needs the serving extras of transformers, which `make` does not install:
    .venv/bin/pip install fastapi uvicorn 'openai>=1.98' 'accelerate>=1.1' 'kernels>=0.19.1,<0.20'
    .venv/bin/python benchmarks/transformers_serve.py [--requests 50] [--compare 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
CORPUS = os.path.join(ROOT, "engine", "assets", "tokenizer_corpus.txt")
PROMPTS = [
    "The quick brown fox",
    "Tell me a story about a robot",
    "What is the capital of France",
    "Write a poem about the sea",
    "Explain attention",
    "How do I cook rice",
]


def checkpoint(path: str) -> str:
    """The engine's tiny random Llama with a transformers tokenizer (BPE, trained on the corpus)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from engine.models.loader import build_random_model, save_checkpoint

    save_checkpoint(build_random_model("tiny", "float32", "cpu", seed=0), path)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train([CORPUS], trainers.BpeTrainer(vocab_size=8000, special_tokens=["<unk>", "<s>", "</s>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RECORD_ARGS: list[str] = []  # --record-args


def serve(ckpt: str, port: int, out: str | None) -> subprocess.Popen:
    cli = os.path.join(os.path.dirname(sys.executable), "transformers")  # this environment's console script
    exe = cli if os.path.exists(cli) else shutil.which("transformers") or "transformers"
    server = [exe, "serve", ckpt, "--port", str(port), "--device", "cpu", "--host", "127.0.0.1"]
    cmd = (
        server
        if out is None
        else [sys.executable, "-m", "llmtrace.cli", "record", "--out", out, *RECORD_ARGS, "--", *server]
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMTRACE_")}
    return subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


def wait_ready(port: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {proc.stderr.read()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("the server did not come up")


async def drive(port: int, ckpt: str, requests: int, concurrency: int, max_tokens: int) -> tuple[int, float]:
    import aiohttp

    sem, tokens = asyncio.Semaphore(concurrency), [0]

    async def one(session, i):
        async with sem:
            body = {"model": ckpt, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens}
            async with session.post(f"http://127.0.0.1:{port}/v1/completions", json=body) as r:
                tokens[0] += (await r.json())["usage"]["completion_tokens"]

    t0 = time.perf_counter()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        await asyncio.gather(*(one(session, i) for i in range(requests)))
    return tokens[0], time.perf_counter() - t0


def run_once(ckpt: str, out: str | None, args) -> float:
    port = free_port()
    proc = serve(ckpt, port, out)
    try:
        wait_ready(port, proc)
        asyncio.run(drive(port, ckpt, 2, 1, 4))  # warm-up
        tokens, secs = asyncio.run(drive(port, ckpt, args.requests, args.concurrency, args.max_tokens))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)  # record forwards it; uvicorn stops; the trace is written
        proc.wait(timeout=120)
    return tokens / secs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=50)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--out", help="run directory of the recording (default: a temporary one)")
    ap.add_argument("--compare", type=int, default=0, metavar="N", help="also N rounds untraced vs recorded")
    ap.add_argument("--record-args", default="", help="options for llmtrace record, e.g. '--sample-hz 0'")
    args = ap.parse_args(argv)
    RECORD_ARGS[:] = args.record_args.split()
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        print("transformers serve needs fastapi and uvicorn: see this script's docstring", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = checkpoint(os.path.join(tmp, "tiny-llama"))
        out = args.out or os.path.join(tmp, "run")
        tok_s = run_once(ckpt, out, args)
        report = json.loads(
            subprocess.run(
                [sys.executable, "-m", "llmtrace.cli", "analyze", "--json", out],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
        print(
            f"recorded: {tok_s:.1f} tok/s, {report['tracing']['spans_recorded']} spans, "
            f"{report['tracing']['stack_samples']} stack samples, processes "
            f"{[p['name'] for p in report['tracing']['processes']]}"
        )
        bd = report["breakdown"]
        if bd is None:
            print("no steps found:", report.get("whole_run"))
        else:
            print(bd["headline"], f"({bd['steps']} steps, {bd['tokens']} tokens; {bd['steps_from']['source']})")
            for r in bd["stages"]:
                tops = ", ".join(f["name"] for f in r.get("top_functions", [])[:2])
                print(f"  {r['name']:<12} {r['ms_per_token']:.3f} ms/token  {tops}")
        for s in report["suggestions"]:
            who = [r["function"] for r in s["evidence"].get("responsible", [])][:1]
            print(f"  {s['id']}: {s['title']} (saves {s['est_saving_ms_per_token']:.3f} ms/token) {who}")
        if args.compare:
            runs = {"untraced": [], "recorded": []}
            for r in range(args.compare):
                for mode in ("untraced", "recorded") if r % 2 == 0 else ("recorded", "untraced"):
                    runs[mode].append(run_once(ckpt, None if mode == "untraced" else os.path.join(tmp, f"c{r}"), args))
            for mode, v in runs.items():
                print(f"{mode}: {', '.join(f'{x:.1f}' for x in v)} tok/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
