"""A small LLM-style pipeline of its own, instrumented with llmtrace, with one deliberate
mistake inside a stage. Record it and read the diagnosis:

    llmtrace record -- python examples/custom_pipeline.py
    llmtrace record --viztracer --viztracer-stages preprocess -- python examples/custom_pipeline.py
    llmtrace record --py-spy -- python examples/custom_pipeline.py

Each step: tokenize -> preprocess -> forward (a stack of numpy matmuls) -> sampling ->
detokenize, under one `pipeline.step` span carrying `step` (the analyzer's step root; its
children are the stages, classified by span name). The mistake: `preprocess` logs the
padded batch at DEBUG with an f-string, so numpy formats the whole array every step even
though DEBUG is off (the seeds' 7 ms of `logging.debug` formatting arrays).
`--fixed` logs lazily instead, for comparison.
"""

from __future__ import annotations

import argparse
import logging

import numpy as np

import llmtrace

log = logging.getLogger("custom_pipeline")
VOCAB = 512
HIDDEN = 96
LAYERS = 4
PAD = 0
_word_ids: dict[str, int] = {}


class TinyModel:
    """Embedding, LAYERS tanh(x @ W) blocks over every position, and an output projection
    of the last position: numpy matmuls."""

    def __init__(self, seed: int = 0):
        rng = np.random.default_rng(seed)
        scale = HIDDEN**-0.5
        self.embed = rng.standard_normal((VOCAB, HIDDEN), dtype=np.float32) * scale
        self.layers = [rng.standard_normal((HIDDEN, HIDDEN), dtype=np.float32) * scale for _ in range(LAYERS)]
        self.lm_head = rng.standard_normal((HIDDEN, VOCAB), dtype=np.float32) * scale


@llmtrace.trace("tokenize")
def tokenize(texts: list[str]) -> list[list[int]]:
    return [[_word_ids.setdefault(w, 1 + len(_word_ids) % (VOCAB - 1)) for w in text.split()] for text in texts]


@llmtrace.trace("preprocess")
def preprocess(ids: list[list[int]], max_len: int, fixed: bool) -> np.ndarray:
    batch = np.full((len(ids), max_len), PAD, dtype=np.int64)
    for row, seq in zip(batch, ids):
        seq = seq[-max_len:]
        row[: len(seq)] = seq
    for i, row in enumerate(batch):
        if fixed:
            log.debug("seq %d: %s", i, row)  # formatted only if DEBUG is on
        else:
            log.debug(f"seq {i}: {row}")  # the mistake: numpy formats the row every step, DEBUG on or off
    return batch


@llmtrace.trace("forward")
def forward(model: TinyModel, batch: np.ndarray) -> np.ndarray:
    x = model.embed[batch]
    for w in model.layers:
        x = np.tanh(x @ w)
    return x[:, -1] @ model.lm_head


@llmtrace.trace("sampling")
def sample(logits: np.ndarray, rng: np.random.Generator, temperature: float = 0.8) -> np.ndarray:
    z = logits / temperature
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    u = rng.random((len(p), 1))
    return (p.cumsum(axis=1) < u).sum(axis=1).clip(0, VOCAB - 1)


@llmtrace.trace("detokenize")
def detokenize(token_ids: np.ndarray) -> list[str]:
    return [f"<{int(t)}>" for t in token_ids]


def make_prompts(n: int, words: int) -> list[str]:
    base = "the quick brown fox jumps over the lazy dog while the cat sleeps".split()
    return [" ".join(base[(i + j) % len(base)] for j in range(words)) for i in range(n)]


def run(steps: int, batch_size: int, max_len: int, fixed: bool) -> list[str]:
    model = TinyModel()
    rng = np.random.default_rng(1)
    prompts = make_prompts(batch_size, max_len)
    out: list[str] = []
    for step in range(steps):
        with llmtrace.span("pipeline.step", step=step, batch=batch_size):
            ids = tokenize(prompts)
            batch = preprocess(ids, max_len, fixed)
            logits = forward(model, batch)
            token_ids = sample(logits, rng)
            out = detokenize(token_ids)
        prompts = [p + " " + t for p, t in zip(prompts, out)]
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-len", type=int, default=64)
    p.add_argument("--fixed", action="store_true", help="log lazily (no array formatting)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    print(" ".join(run(args.steps, args.batch, args.max_len, args.fixed)[:4]))


if __name__ == "__main__":
    main()
