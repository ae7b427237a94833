"""What the example pipelines share and llmtrace does not provide: a tiny random-weight
torch language model, the repo's sentencepiece tokenizer, a load generator, and the
switches for the planted mistakes. None of the pipelines imports llmtrace.

Mistakes are on by default and switched off one by one with PLANT_<NAME>=0, or all at
once with PIPELINE_CLEAN=1 (the clean variant). PIPELINE_DEVICE=cuda puts the model of
the pipelines that support it on a GPU."""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import sentencepiece
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
TOKENIZER = os.path.join(HERE, "..", "..", "engine", "assets", "tokenizer.model")
VOCAB = 8000  # the shipped sentencepiece model's vocabulary
EOS = 2


DEVICE = os.environ.get("PIPELINE_DEVICE", "cpu")


def planted(name: str) -> bool:
    """Whether mistake `name` is switched on (PLANT_<NAME>, default on; PIPELINE_CLEAN=1 off)."""
    if os.environ.get("PIPELINE_CLEAN") == "1":
        return False
    return os.environ.get(f"PLANT_{name.upper()}", "1") != "0"


def tokenizer() -> sentencepiece.SentencePieceProcessor:
    return sentencepiece.SentencePieceProcessor(model_file=TOKENIZER)


class TinyLM(torch.nn.Module):
    """Embedding, a few residual MLP blocks over the last token, and an LM head: enough
    compute to look like a model step on a CPU (a few ms at batch 8)."""

    def __init__(self, hidden: int = 512, layers: int = 4, vocab: int = VOCAB, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(
                torch.nn.Linear(hidden, 2 * hidden), torch.nn.GELU(), torch.nn.Linear(2 * hidden, hidden)
            )
            for _ in range(layers)
        )
        self.head = torch.nn.Linear(hidden, vocab)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [batch, tokens] -> logits of the last position [batch, vocab]."""
        x = self.embed(input_ids).mean(dim=1)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


# A chat server's prompts start with the same system prompt (~230 tokens here), so the
# sequences a serving loop carries are hundreds of tokens long, as real ones are.
SYSTEM_PROMPT = " ".join(
    [
        "You are a helpful, careful assistant for a team of engineers who run language model servers.",
        "Answer in plain words, keep each answer short, and say so when you are not sure.",
        "When a question is about code, name the function and the file, give the smallest change that",
        "fixes the problem, and explain what it costs at run time. When a question is about numbers,",
        "say how they were measured, how many times, and how much they varied between runs.",
        "Never invent a setting, a flag or an interface that the system does not have; if the user asks",
        "for one, say that it does not exist and offer the closest thing that does. Prefer measurements",
        "to guesses, and small experiments to long arguments. If a request is ambiguous, ask one short",
        "question before answering. Do not repeat the question back. Do not apologise for the length of",
        "an answer. Use units everywhere: milliseconds per token, tokens per second, bytes per step.",
    ]
)
PROMPTS = [
    "The quick brown fox jumps over the lazy dog",
    "Tell me a story about a robot",
    "What is the capital of France",
    "Write a poem about the sea",
    "Explain attention in transformers",
    "How do I cook rice",
    "List three prime numbers",
    "Summarize the plot of Hamlet",
]


def drive(url: str, requests: int, concurrency: int, max_tokens: int, system_prompt: bool = True) -> dict:
    """POST `requests` generate calls, `concurrency` at a time, each prompt after the system
    prompt unless told otherwise; returns {tokens, seconds}. A failed request stops its
    worker; any failure raises once the others are done."""
    lock, done, tokens, errors = threading.Lock(), [0], [0], []

    def worker() -> None:
        try:
            send_requests()
        except Exception as e:  # noqa: BLE001 (any failure fails the run, after the others)
            errors.append(e)

    def send_requests() -> None:
        while True:
            with lock:
                if done[0] >= requests:
                    return
                i = done[0]
                done[0] += 1
            prompt = f"User: {PROMPTS[i % len(PROMPTS)]}\nAssistant:"
            if system_prompt:
                prompt = f"{SYSTEM_PROMPT}\n\n{prompt}"
            body = json.dumps({"prompt": prompt, "max_tokens": max_tokens}).encode()
            req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=120) as r:
                    n = len(json.loads(r.read())["token_ids"])
            except urllib.error.HTTPError as e:
                raise RuntimeError(f"HTTP {e.code}: {e.read().decode(errors='replace')}") from None
            with lock:
                tokens[0] += n

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} of {concurrency} clients failed, the first with {errors[0]!r}")
    return {"tokens": tokens[0], "seconds": time.perf_counter() - t0}


def serve_generate(generate: Callable[[list[int], int], list[int]], sp) -> tuple[ThreadingHTTPServer, str]:
    """An http.server front end in a thread: POST /generate {"prompt", "max_tokens"} ->
    {"text", "token_ids"}, handler threads tokenizing and calling generate(prompt ids,
    max tokens) -> output ids. Returns the server and its URL."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            try:
                out = generate(sp.encode(body["prompt"]), int(body.get("max_tokens", 16)))
                status, data = 200, json.dumps({"text": sp.decode(out), "token_ids": out}).encode()
            except Exception as e:  # noqa: BLE001 (the engine failed: say so, keep serving)
                status, data = 500, json.dumps({"error": repr(e)}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/generate"


def print_result(pipeline: str, result: dict) -> None:
    """The line the benchmarks read: output tokens, seconds and tokens/s of the load."""
    print(json.dumps({"pipeline": pipeline, **result, "tok_s": round(result["tokens"] / result["seconds"], 1)}))


class Request:
    """A request handed from an HTTP handler thread to the serving loop; the loop appends
    to `out` and sets `done`."""

    def __init__(self, prompt_ids: list[int], max_tokens: int):
        self.ids, self.max_tokens, self.out = list(prompt_ids), max_tokens, []
        self.done = threading.Event()


def advance(running: list[Request], next_ids: list[int]) -> list[Request]:
    """Append each request's new token; wake the finished ones; the ones still running."""
    still = []
    for r, t in zip(running, next_ids):
        r.ids.append(t)
        r.out.append(t)
        if len(r.out) >= r.max_tokens or t == EOS:
            r.done.set()
        else:
            still.append(r)
    return still


def blocking(put: Callable[[Request], None]) -> Callable[[list[int], int], list[int]]:
    """generate() for serve_generate: hand a Request to the loop with `put`, wait for it."""

    def generate(prompt_ids: list[int], max_tokens: int) -> list[int]:
        req = Request(prompt_ids, max_tokens)
        put(req)
        req.done.wait()
        return req.out

    return generate


def load_args(doc: str, requests: int = 32, concurrency: int = 8, max_tokens: int = 32) -> argparse.ArgumentParser:
    """The load options every pipeline takes (its own are added by the caller)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--requests", type=int, default=requests)
    ap.add_argument("--concurrency", type=int, default=concurrency)
    ap.add_argument("--max-tokens", type=int, default=max_tokens)
    return ap
