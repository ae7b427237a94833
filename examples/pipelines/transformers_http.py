"""A small HTTP server around a Hugging Face `transformers` Llama with a hand-written
decode loop, one request at a time, the way many first servers are written: the handler
tokenizes, runs the model token by token and samples in Python. The model is a tiny
random-weight LlamaForCausalLM built from a config (nothing is downloaded).

    python examples/pipelines/transformers_http.py [--requests 12 --max-tokens 48]
    llmtrace record -- python examples/pipelines/transformers_http.py

Planted mistakes (on by default; PLANT_<NAME>=0 switches one off, PIPELINE_CLEAN=1 all):
  no_kv_cache   every step runs the whole sequence again (use_cache=False) instead of
                feeding the new token with past_key_values
  host_softmax  the next token comes from a numpy softmax + argmax over the whole vocab
                row copied to the host, instead of torch.argmax on the logits
  log_arrays    each step logs the five most likely tokens and their probabilities at
                INFO, through a handler
"""

from __future__ import annotations

import io
import logging
import threading

import numpy as np
import torch
from common import EOS, VOCAB, drive, load_args, planted, print_result, serve_generate, tokenizer

log = logging.getLogger("transformers_http")


def build_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
    )
    return LlamaForCausalLM(cfg).eval()


class Generator:
    def __init__(self, model):
        self.model = model
        self.lock = threading.Lock()
        self.no_cache, self.host_softmax, self.log_arrays = (
            planted("no_kv_cache"),
            planted("host_softmax"),
            planted("log_arrays"),
        )

    @torch.no_grad()
    def generate(self, prompt_ids: list[int], max_tokens: int) -> list[int]:
        with self.lock:
            ids, out, past = torch.tensor([prompt_ids]), [], None
            for _ in range(max_tokens):
                if self.no_cache:
                    logits = self.model(ids, use_cache=False).logits[:, -1]
                else:
                    step = self.model(ids if past is None else ids[:, -1:], past_key_values=past, use_cache=True)
                    logits, past = step.logits[:, -1], step.past_key_values
                token = self.sample(logits)
                out.append(token)
                if token == EOS:
                    break
                ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
            return out

    def sample(self, logits: torch.Tensor) -> int:
        if self.host_softmax:
            row = logits[0].numpy()
            p = np.exp(row - row.max())
            p /= p.sum()
            token = int(np.argmax(p))
            if self.log_arrays:
                top = np.argsort(p)[-5:][::-1]
                log.info("top tokens %s probs %s", top.tolist(), p[top].round(4).tolist())
            return token
        token = int(torch.argmax(logits[0]))
        if self.log_arrays:
            probs = torch.softmax(logits[0], dim=-1)
            top = torch.topk(probs, 5)
            log.info("top tokens %s probs %s", top.indices.tolist(), top.values.round(decimals=4).tolist())
        return token


def main() -> None:
    args = load_args(__doc__, requests=12, concurrency=1, max_tokens=48).parse_args()
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, stream=io.StringIO(), format="%(asctime)s %(name)s %(message)s")
    server, url = serve_generate(Generator(build_model()).generate, tokenizer())
    # no system prompt: a transformer recomputing ~230 more tokens per step (no_kv_cache) would
    # take ~40 ms/token and leave the other mistakes inside its run-to-run noise
    result = drive(url, args.requests, args.concurrency, args.max_tokens, system_prompt=False)
    server.shutdown()
    print_result("transformers_http", result)


if __name__ == "__main__":
    main()
