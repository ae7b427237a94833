"""A serving program of a common shape: http.server handler threads tokenize a request
and hand it through a queue.Queue to one engine thread, which batches the running
requests, runs the model one decode step at a time and wakes each handler when its
request is done. Run standalone, it serves, drives itself with a load and exits:

    python examples/pipelines/thread_queue_server.py [--requests 32 --concurrency 8]
    llmtrace record -- python examples/pipelines/thread_queue_server.py

Planted mistakes (on by default; PLANT_<NAME>=0 switches one off, PIPELINE_CLEAN=1 all):
  log_arrays   an f-string in log.debug formats the logits tensor every step, DEBUG off or on
  host_argmax  the next token is an argmax in Python over logits.tolist() (the full vocab)
  poll_sleep   the engine sleeps 3 ms each step "to let more requests arrive"
"""
from __future__ import annotations

import argparse
import logging
import queue
import threading
import time

import torch
from common import DEVICE, EOS, TinyLM, drive, planted, print_result, serve_generate, tokenizer

log = logging.getLogger("thread_queue_server")
WINDOW = 16  # the model sees each sequence's last WINDOW tokens


class Request:
    def __init__(self, prompt_ids: list[int], max_tokens: int):
        self.ids, self.max_tokens, self.out = list(prompt_ids), max_tokens, []
        self.done = threading.Event()


class Engine(threading.Thread):
    def __init__(self, model: TinyLM, max_batch: int = 8):
        super().__init__(name="engine", daemon=True)
        self.model, self.max_batch = model, max_batch
        self.inbox: queue.Queue[Request] = queue.Queue()
        self.running: list[Request] = []
        self.log_arrays, self.host_argmax, self.poll_sleep = (planted("log_arrays"), planted("host_argmax"),
                                                              planted("poll_sleep"))

    def run(self) -> None:
        while True:
            if not self.running:
                self.running.append(self.inbox.get())  # idle until a request comes
            self.admit()
            self.step()

    def admit(self) -> None:
        if self.poll_sleep:
            time.sleep(0.003)
        while len(self.running) < self.max_batch:
            try:
                self.running.append(self.inbox.get_nowait())
            except queue.Empty:
                break

    @torch.no_grad()
    def step(self) -> None:
        ids = torch.tensor([(r.ids[-WINDOW:] + [0] * WINDOW)[:WINDOW] for r in self.running], device=DEVICE)
        logits = self.model(ids)
        if self.log_arrays:
            log.debug(f"step logits {logits}")
        next_ids = self.argmax_on_host(logits) if self.host_argmax else logits.argmax(dim=-1).tolist()
        still = []
        for r, t in zip(self.running, next_ids):
            r.ids.append(t)
            r.out.append(t)
            if len(r.out) >= r.max_tokens or t == EOS:
                r.done.set()
            else:
                still.append(r)
        self.running = still

    @staticmethod
    def argmax_on_host(logits: torch.Tensor) -> list[int]:
        return [max(range(len(row)), key=row.__getitem__) for row in logits.tolist()]


def submit(engine: Engine):
    def generate(prompt_ids: list[int], max_tokens: int) -> list[int]:
        req = Request(prompt_ids, max_tokens)
        engine.inbox.put(req)
        req.done.wait()
        return req.out

    return generate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(1)
    engine = Engine(TinyLM().to(DEVICE))
    engine.start()
    server, url = serve_generate(submit(engine), tokenizer())
    result = drive(url, args.requests, args.concurrency, args.max_tokens)
    server.shutdown()
    print_result("thread_queue_server", result)


if __name__ == "__main__":
    main()
