"""vLLM v1's process shape: a front-end process (HTTP handlers that tokenize, an output
thread that resolves requests) and an engine-core process that runs the scheduler and
the model in a busy loop, joined by two ZMQ PUSH/PULL sockets over ipc:// carrying
msgpack messages. Every output token comes with its top-5 log-probabilities.

    python examples/pipelines/zmq_engine_core.py [--requests 32 --concurrency 8]
    llmtrace record -- python examples/pipelines/zmq_engine_core.py

Planted mistakes (on by default; PLANT_<NAME>=0 switches one off, PIPELINE_CLEAN=1 all):
  poll_wait      the engine core polls its input socket with a 3 ms timeout every step,
                 also while requests are running or waiting (the idle loop's timeout)
  full_logprobs  each step's outputs carry every sequence's whole log-probability row
                 (the vocabulary, as a msgpack'd list) and the front end picks the top 5
  log_arrays     the engine core %-formats the step's input tensor into a log.debug message,
                 DEBUG off or on
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import subprocess
import sys
import tempfile
import threading
from collections import deque

import msgpack
import numpy as np
import zmq
from common import EOS, TinyLM, drive, load_args, planted, print_result, serve_generate, tokenizer

log = logging.getLogger("zmq_engine_core")
WINDOW, MAX_BATCH, TOP_LOGPROBS = 16, 8, 5


# ---------------------------------------------------------------- engine-core process


class EngineCore:
    def __init__(self, requests: zmq.Socket, outputs: zmq.Socket):
        import torch

        torch.set_num_threads(1)
        self.torch, self.model = torch, TinyLM()
        self.requests, self.outputs = requests, outputs
        self.waiting: deque = deque()  # (rid, prompt ids, max tokens)
        self.running: dict[int, tuple[list[int], int, int]] = {}  # rid -> (ids, max tokens, produced)
        self.poll_wait, self.full_logprobs, self.log_arrays = (
            planted("poll_wait"),
            planted("full_logprobs"),
            planted("log_arrays"),
        )
        self.poller = zmq.Poller()
        self.poller.register(requests, zmq.POLLIN)

    def admit(self) -> bool:
        """Queue what arrived, then fill the batch. The wait blocks only when idle (the
        mistake: up to 3 ms every step). False on the shutdown message."""
        timeout = None if not (self.running or self.waiting) else (3 if self.poll_wait else 0)
        while self.poller.poll(timeout):
            msg = msgpack.unpackb(self.requests.recv())
            if msg is None:
                return False
            self.waiting.append(msg)
            timeout = 0
        while self.waiting and len(self.running) < MAX_BATCH:
            rid, ids, n = self.waiting.popleft()
            self.running[rid] = (list(ids), n, 0)
        return True

    def step(self) -> None:
        rids = list(self.running)
        x = self.torch.tensor([(self.running[r][0][-WINDOW:] + [0] * WINDOW)[:WINDOW] for r in rids])
        if self.log_arrays:
            log.debug("step input %s" % x)
        logprobs = self.torch.log_softmax(self.model(x), dim=-1)
        next_ids = logprobs.argmax(dim=-1).tolist()
        if self.full_logprobs:
            rows = logprobs.tolist()
        else:
            top = logprobs.topk(TOP_LOGPROBS, dim=-1)
            rows = [list(zip(i, v)) for i, v in zip(top.indices.tolist(), top.values.tolist())]
        out = []
        for rid, t, row in zip(rids, next_ids, rows):
            ids, n, produced = self.running[rid]
            ids.append(t)
            done = produced + 1 >= n or t == EOS
            self.running[rid] = (ids, n, produced + 1)
            if done:
                del self.running[rid]
            out.append((rid, t, done, row))
        self.outputs.send(msgpack.packb(out))

    def run(self) -> None:
        with self.torch.no_grad():
            while self.admit():
                if self.running:
                    self.step()


def engine_core_main(requests_addr: str, outputs_addr: str) -> None:
    ctx = zmq.Context()
    requests, outputs = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    requests.connect(requests_addr)
    outputs.connect(outputs_addr)
    EngineCore(requests, outputs).run()
    outputs.send(msgpack.packb(None))
    requests.close()
    outputs.close(linger=1000)
    ctx.term()


# ---------------------------------------------------------------- front-end process


class EngineDead(RuntimeError):
    pass


class EngineClient:
    """What the HTTP handlers call: sends each request to the engine core and waits for
    its output thread to collect the tokens (failing, not hanging, once the core is gone)."""

    def __init__(self, ctx: zmq.Context, requests_addr: str, outputs_addr: str):
        self.requests, self.outputs = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
        self.requests.setsockopt(zmq.SNDTIMEO, 1000)
        self.requests.bind(requests_addr)
        self.outputs.bind(outputs_addr)
        self.lock = threading.Lock()  # zmq sockets are not thread-safe
        self.waiting: dict[int, tuple[threading.Event, list[int], list]] = {}
        self.ids = itertools.count()
        self.thread = threading.Thread(target=self.collect, name="output-thread", daemon=True)
        self.thread.start()
        self.core: subprocess.Popen | None = None

    def check_alive(self) -> None:
        if self.core is not None and self.core.poll() is not None:
            raise EngineDead(f"the engine core exited with code {self.core.returncode}")
        if not self.thread.is_alive():
            raise EngineDead("the output thread is gone")

    def send(self, msg) -> None:
        """Send unless the core is gone (a PUSH socket with no peer blocks: for a second at a
        time here, SNDTIMEO)."""
        with self.lock:
            while True:
                self.check_alive()
                try:
                    return self.requests.send(msgpack.packb(msg))
                except zmq.Again:
                    pass

    def generate(self, prompt_ids: list[int], max_tokens: int) -> list[int]:
        ev, out, logprobs = threading.Event(), [], []
        rid = next(self.ids)
        self.waiting[rid] = (ev, out, logprobs)
        self.send((rid, prompt_ids, max_tokens))
        while not ev.wait(1.0):
            self.check_alive()
        return out

    def collect(self) -> None:
        while (outputs := msgpack.unpackb(self.outputs.recv())) is not None:
            for rid, t, done, row in outputs:
                ev, out, logprobs = self.waiting[rid]
                out.append(t)
                logprobs.append(top_logprobs(row))
                if done:
                    del self.waiting[rid]
                    ev.set()

    def shutdown(self) -> None:
        self.send(None)
        self.thread.join(timeout=30)


def top_logprobs(row: list) -> list:
    """[(token, logprob)] of the top TOP_LOGPROBS: the row is either those pairs already or
    the whole vocabulary's log-probabilities."""
    if row and isinstance(row[0], (list, tuple)):
        return [tuple(p) for p in row]
    lp = np.asarray(row)
    top = np.argpartition(lp, -TOP_LOGPROBS)[-TOP_LOGPROBS:]
    return [(int(i), float(lp[i])) for i in top[np.argsort(-lp[top])]]


def main() -> None:
    ap = load_args(__doc__)
    ap.add_argument("--engine-core", nargs=2, metavar=("REQUESTS", "OUTPUTS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.engine_core:
        engine_core_main(*args.engine_core)
        return
    with tempfile.TemporaryDirectory() as tmp:
        addrs = [f"ipc://{os.path.join(tmp, name)}" for name in ("requests", "outputs")]
        ctx = zmq.Context()
        client = EngineClient(ctx, *addrs)
        core = client.core = subprocess.Popen([sys.executable, __file__, "--engine-core", *addrs])
        try:
            server, url = serve_generate(client.generate, tokenizer())
            result = drive(url, args.requests, args.concurrency, args.max_tokens)
            server.shutdown()
            client.shutdown()
            core.wait(timeout=30)
        finally:
            if core.poll() is None:
                core.kill()
        ctx.destroy(linger=0)
    print_result("zmq_engine_core", result)


if __name__ == "__main__":
    main()
