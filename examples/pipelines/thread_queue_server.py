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
  stop_text    to look for a stop string, the engine decodes each running sequence whole
               (prompt and output) every step and cuts the prompt's text off; the clean
               variant decodes only the last few output tokens
"""

from __future__ import annotations

import logging
import queue
import threading
import time

import torch
from common import (
    DEVICE,
    Request,
    TinyLM,
    advance,
    blocking,
    drive,
    load_args,
    planted,
    print_result,
    serve_generate,
    tokenizer,
)

log = logging.getLogger("thread_queue_server")
WINDOW = 16  # the model sees each sequence's last WINDOW tokens
STOP = "\n\nUser:"  # a request ends when its text has this
TAIL = 8  # output tokens the clean stop check decodes


class Engine(threading.Thread):
    def __init__(self, model: TinyLM, sp, max_batch: int = 8):
        super().__init__(name="engine", daemon=True)
        self.model, self.sp, self.max_batch = model, sp, max_batch
        self.inbox: queue.Queue[Request] = queue.Queue()
        self.running: list[Request] = []
        self.log_arrays, self.host_argmax, self.poll_sleep, self.stop_text = (
            planted("log_arrays"),
            planted("host_argmax"),
            planted("poll_sleep"),
            planted("stop_text"),
        )

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
        self.running = [r for r in advance(self.running, next_ids) if not self.stopped(r)]

    def stopped(self, r: Request) -> bool:
        """Whether the request's text reached the stop string (then it is done)."""
        if self.stop_text:
            prompt = len(self.sp.decode(r.ids[: len(r.ids) - len(r.out)]))
            text = self.sp.decode(r.ids)[prompt:]
        else:
            text = self.sp.decode(r.out[-TAIL:])
        if STOP in text:
            r.done.set()
            return True
        return False

    @staticmethod
    def argmax_on_host(logits: torch.Tensor) -> list[int]:
        return [max(range(len(row)), key=row.__getitem__) for row in logits.tolist()]


def main() -> None:
    args = load_args(__doc__).parse_args()
    torch.set_num_threads(1)
    sp = tokenizer()
    engine = Engine(TinyLM().to(DEVICE), sp)
    engine.start()
    server, url = serve_generate(blocking(engine.inbox.put), sp)
    result = drive(url, args.requests, args.concurrency, args.max_tokens)
    server.shutdown()
    print_result("thread_queue_server", result)


if __name__ == "__main__":
    main()
